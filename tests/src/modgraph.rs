//! The module dependency graph of a crate, read from its sources, and the import cycles in
//! it. A module is one file (`mod.rs` is its directory's module). Module `a` depends on `b`
//! when `a`'s non-test code names a path into `b` (`crate::b::X`, `super::X`, `self::b::X`,
//! or `b::X` for a child `b` of `a`), in a `use` tree or inline; a re-export counts. Code
//! in a `#[cfg(test)]` module does not: tests may look at their neighbours.
//!
//! A cycle means two modules can only be understood, changed and tested together; the
//! architecture check fails on any (`tests/tests/module_graph.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path from the crate root, e.g. `["devices", "virtio_mmio"]`; the root is `[]`.
pub type ModPath = Vec<String>;

/// Where a dependency was seen: the file and line of one reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub file: PathBuf,
    pub line: usize,
}

/// Modules of one crate and, for each, the modules it depends on.
#[derive(Debug, Default)]
pub struct Graph {
    pub files: BTreeMap<ModPath, PathBuf>,
    pub edges: BTreeMap<ModPath, BTreeMap<ModPath, Seen>>,
}

/// Reads the crate rooted at `root` (its `lib.rs` or `main.rs`), following `mod NAME;`
/// declarations (except `#[cfg(test)]` ones) to every module file.
pub fn read_crate(root: &Path) -> std::io::Result<Graph> {
    let mut graph = Graph::default();
    let mut sources: BTreeMap<ModPath, Vec<Token>> = BTreeMap::new();
    let mut children: BTreeMap<ModPath, BTreeSet<String>> = BTreeMap::new();
    let mut todo: Vec<(ModPath, PathBuf)> = vec![(Vec::new(), root.to_path_buf())];
    while let Some((module, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("read {}: {e}", file.display())))?;
        let tokens = without_test_modules(tokenize(&text));
        let dir = module_dir(&module, &file);
        let mut names = BTreeSet::new();
        for name in declared_modules(&tokens) {
            let candidates = [
                dir.join(format!("{name}.rs")),
                dir.join(&name).join("mod.rs"),
            ];
            let Some(child_file) = candidates.into_iter().find(|p| p.is_file()) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{}: mod {name} has no file", file.display()),
                ));
            };
            let mut child = module.clone();
            child.push(name.clone());
            todo.push((child, child_file));
            names.insert(name);
        }
        children.insert(module.clone(), names);
        graph.files.insert(module.clone(), file);
        sources.insert(module, tokens);
    }
    let known: BTreeSet<ModPath> = graph.files.keys().cloned().collect();
    for (module, tokens) in &sources {
        let file = graph.files[module].clone();
        let kids = &children[module];
        let mut deps: BTreeMap<ModPath, Seen> = BTreeMap::new();
        for (path, line) in referenced_paths(tokens) {
            let Some(absolute) = absolute(module, kids, &path) else {
                continue;
            };
            let target = longest_module_prefix(&known, &absolute);
            if &target == module {
                continue;
            }
            deps.entry(target).or_insert_with(|| Seen {
                file: file.clone(),
                line,
            });
        }
        graph.edges.insert(module.clone(), deps);
    }
    Ok(graph)
}

/// Where a module's children live: beside a crate root or `mod.rs`, else in a directory
/// named after the module.
fn module_dir(module: &ModPath, file: &Path) -> PathBuf {
    let parent = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if module.is_empty() || stem == "mod" {
        parent
    } else {
        parent.join(stem)
    }
}

fn longest_module_prefix(known: &BTreeSet<ModPath>, path: &[String]) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
        .unwrap_or_default()
}

/// Makes a path written in `module` absolute from the crate root, or None for a path into
/// another crate (or a local name).
fn absolute(module: &ModPath, children: &BTreeSet<String>, path: &[String]) -> Option<ModPath> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "self" => Some(
            module
                .iter()
                .cloned()
                .chain(path[1..].iter().cloned())
                .collect(),
        ),
        "super" => {
            let mut base = module.clone();
            let mut rest = path;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
            Some(base.into_iter().chain(rest.iter().cloned()).collect())
        }
        name if children.contains(name) => {
            Some(module.iter().cloned().chain(path.iter().cloned()).collect())
        }
        _ => None,
    }
}

/// The cycles: every strongly connected set of two or more modules, each as its members
/// in order with the edges among them.
pub fn cycles(graph: &Graph) -> Vec<Vec<ModPath>> {
    let nodes: Vec<&ModPath> = graph.files.keys().collect();
    let index_of: BTreeMap<&ModPath, usize> =
        nodes.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let adjacency: Vec<Vec<usize>> = nodes
        .iter()
        .map(|m| {
            graph
                .edges
                .get(*m)
                .into_iter()
                .flat_map(|d| d.keys())
                .filter_map(|t| index_of.get(t).copied())
                .collect()
        })
        .collect();
    strongly_connected(&adjacency)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut members: Vec<ModPath> = c.into_iter().map(|i| nodes[i].clone()).collect();
            members.sort();
            members
        })
        .collect()
}

/// Tarjan's algorithm, iterative (a deep module tree must not overflow the test's stack).
fn strongly_connected(adjacency: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = adjacency.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        let mut frames: Vec<(usize, usize)> = vec![(start, 0)];
        index[start] = next;
        low[start] = next;
        next += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (v, ref mut edge)) = frames.last_mut() {
            if let Some(&w) = adjacency[v].get(*edge) {
                *edge += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    frames.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            frames.pop();
            if let Some(&(parent, _)) = frames.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(component);
            }
        }
    }
    out
}

/// Names a module for messages: `crate` for the root.
pub fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// Describes a cycle with one reference for each dependency inside it.
pub fn describe(graph: &Graph, cycle: &[ModPath]) -> String {
    let mut lines = vec![format!(
        "cycle among {}:",
        cycle.iter().map(|m| name(m)).collect::<Vec<_>>().join(", ")
    )];
    for from in cycle {
        for (to, seen) in graph.edges.get(from).into_iter().flatten() {
            if cycle.contains(to) {
                lines.push(format!(
                    "  {} -> {} ({}:{})",
                    name(from),
                    name(to),
                    seen.file.display(),
                    seen.line
                ));
            }
        }
    }
    lines.join("\n")
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String, usize),
    Punct(char, usize),
}

impl Token {
    fn is(&self, c: char) -> bool {
        matches!(self, Token::Punct(p, _) if *p == c)
    }

    fn ident(&self) -> Option<&str> {
        match self {
            Token::Ident(s, _) => Some(s),
            Token::Punct(..) => None,
        }
    }

    fn line(&self) -> usize {
        match self {
            Token::Ident(_, l) | Token::Punct(_, l) => *l,
        }
    }
}

/// Identifiers and punctuation with their lines; comments, strings and char literals are
/// dropped (a path in a doc comment or a message is not a dependency).
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == 'r' && (at(i + 1) == '#' || at(i + 1) == '"') && raw_string_start(&chars, i)
        {
            // r"..." or r#"..."#: ends at a quote followed by as many hashes.
            let mut j = i + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                if chars[j] == '\n' {
                    line += 1;
                }
                j += 1;
            }
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F}') or a lifetime ('a): only a literal closes.
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // b"..." and br"...": the prefix is not an identifier of interest.
            tokens.push(Token::Ident(word, line));
        } else {
            tokens.push(Token::Punct(c, line));
            i += 1;
        }
    }
    tokens
}

/// Whether the `r` at `i` opens a raw string (and is not the end of an identifier).
fn raw_string_start(chars: &[char], i: usize) -> bool {
    let prev_ident = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    let prefix_b = i > 0
        && chars[i - 1] == 'b'
        && !(i > 1 && (chars[i - 2].is_alphanumeric() || chars[i - 2] == '_'));
    if prev_ident && !prefix_b {
        return false;
    }
    let mut j = i + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

/// Drops `#[cfg(test)] mod NAME { ... }` blocks and `#[cfg(test)] mod NAME;` declarations.
fn without_test_modules(tokens: Vec<Token>) -> Vec<Token> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        if let Some(after) = cfg_test_attribute(&tokens, i) {
            let mut j = after;
            // `pub`, `pub(crate)`, `pub(super)`, `pub(in path)`.
            if tokens.get(j).and_then(Token::ident) == Some("pub") {
                j += 1;
                if tokens.get(j).is_some_and(|t| t.is('(')) {
                    while tokens.get(j).is_some_and(|t| !t.is(')')) {
                        j += 1;
                    }
                    j += 1;
                }
            }
            if tokens.get(j).and_then(Token::ident) == Some("mod") {
                // mod NAME ; | mod NAME { ... }
                let k = j + 2;
                if tokens.get(k).is_some_and(|t| t.is(';')) {
                    i = k + 1;
                    continue;
                }
                if tokens.get(k).is_some_and(|t| t.is('{')) {
                    let mut depth = 0;
                    let mut m = k;
                    while m < tokens.len() {
                        if tokens[m].is('{') {
                            depth += 1;
                        } else if tokens[m].is('}') {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        m += 1;
                    }
                    i = m + 1;
                    continue;
                }
            }
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    out
}

/// If `#[cfg(test)]` starts at `i`, the index after it.
fn cfg_test_attribute(tokens: &[Token], i: usize) -> Option<usize> {
    let pattern = ["#", "[", "cfg", "(", "test", ")", "]"];
    for (k, want) in pattern.iter().enumerate() {
        let t = tokens.get(i + k)?;
        let matches = match t {
            Token::Ident(s, _) => s == want,
            Token::Punct(c, _) => want.len() == 1 && want.starts_with(*c),
        };
        if !matches {
            return None;
        }
    }
    Some(i + pattern.len())
}

/// `mod NAME;` declarations (a file each).
fn declared_modules(tokens: &[Token]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.ident() != Some("mod") {
            continue;
        }
        if let (Some(name), Some(end)) =
            (tokens.get(i + 1).and_then(Token::ident), tokens.get(i + 2))
        {
            if end.is(';') {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Every path that starts at an identifier followed by `::`, with `use` trees expanded
/// (`a::{b, c::{d}}` gives `a::b`, `a::c::d`), and the line it is on.
fn referenced_paths(tokens: &[Token]) -> Vec<(Vec<String>, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let starts_path = tokens[i].ident().is_some()
            && double_colon(tokens, i + 1)
            && !(i >= 2 && double_colon(tokens, i - 2));
        if starts_path {
            let line = tokens[i].line();
            let mut prefix = Vec::new();
            i = read_tree(tokens, i, &mut prefix, &mut out, line);
        } else {
            i += 1;
        }
    }
    out
}

fn double_colon(tokens: &[Token], i: usize) -> bool {
    tokens.get(i).is_some_and(|t| t.is(':')) && tokens.get(i + 1).is_some_and(|t| t.is(':'))
}

/// Reads a path or use tree at `i` under `prefix`, pushing each complete path; returns the
/// index after it.
fn read_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, usize)>,
    line: usize,
) -> usize {
    let depth = prefix.len();
    loop {
        match tokens.get(i) {
            Some(Token::Ident(s, _)) => {
                prefix.push(s.clone());
                i += 1;
                if double_colon(tokens, i) {
                    i += 2;
                    continue;
                }
                out.push((prefix.clone(), line));
                break;
            }
            Some(t) if t.is('{') => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(t) if t.is('}') => {
                            i += 1;
                            break;
                        }
                        Some(t) if t.is(',') => i += 1,
                        Some(Token::Ident(..)) | Some(Token::Punct('{', _)) => {
                            let mut inner = prefix.clone();
                            i = read_tree(tokens, i, &mut inner, out, line);
                            // `as NAME` renames the leaf: not a path.
                            if tokens.get(i).and_then(Token::ident) == Some("as") {
                                i += 2;
                            }
                        }
                        Some(t) if t.is('*') => {
                            out.push((prefix.clone(), line));
                            i += 1;
                        }
                        Some(_) => i += 1,
                        None => break,
                    }
                }
                break;
            }
            Some(t) if t.is('*') => {
                out.push((prefix.clone(), line));
                i += 1;
                break;
            }
            _ => {
                if prefix.len() > depth {
                    out.push((prefix.clone(), line));
                }
                break;
            }
        }
    }
    prefix.truncate(depth);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("modgraph-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn p(s: &str) -> ModPath {
        s.split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn finds_a_cycle_through_a_use_tree_and_an_inline_path() {
        let dir = scratch("cycle");
        write(
            &dir,
            &[
                ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
                ("a.rs", "use crate::{b::{One, Two as Three}, c};\n"),
                ("b.rs", "fn f() { let x = crate::c::g(); }\n"),
                (
                    "c.rs",
                    "// crate::b::Nope in a comment\nfn g() { super::a::h() }\n",
                ),
            ],
        );
        let graph = read_crate(&dir.join("lib.rs")).unwrap();
        assert_eq!(cycles(&graph), vec![vec![p("a"), p("b"), p("c")]]);
        let text = describe(&graph, &cycles(&graph)[0]);
        assert!(
            text.contains("c -> a (") && text.ends_with("c.rs:2)"),
            "{text}"
        );
    }

    #[test]
    fn parent_and_child_referring_to_each_other_is_a_cycle() {
        let dir = scratch("nested");
        write(
            &dir,
            &[
                ("lib.rs", "pub mod disk;\n"),
                (
                    "disk/mod.rs",
                    "mod config;\npub use config::Options;\npub struct Error;\n",
                ),
                ("disk/config.rs", "use super::Error;\npub struct Options;\n"),
            ],
        );
        let graph = read_crate(&dir.join("lib.rs")).unwrap();
        assert_eq!(cycles(&graph), vec![vec![p("disk"), p("disk::config")]]);
    }

    #[test]
    fn tests_strings_and_other_crates_are_not_dependencies() {
        let dir = scratch("clean");
        write(
            &dir,
            &[
                ("lib.rs", "pub mod a;\npub mod b;\n#[cfg(test)]\nmod t;\n"),
                ("a.rs", "use crate::b::X;\nuse std::io;\nfn f() -> char { '}' }\n"),
                (
                    "b.rs",
                    "pub struct X;\nconst S: &str = \"crate::a::f\";\nconst R: &str = r#\"crate::a\"#;\n\
                     fn l<'a>(x: &'a str) -> &'a str { x }\n\
                     #[cfg(test)]\nmod tests {\n    use crate::a::*;\n}\n\
                     #[cfg(test)]\npub(crate) mod helpers {\n    use crate::a::f;\n}\n",
                ),
                ("t.rs", "use crate::a;\n"),
            ],
        );
        let graph = read_crate(&dir.join("lib.rs")).unwrap();
        assert!(cycles(&graph).is_empty(), "{:?}", graph.edges);
        assert!(graph.edges[&p("a")].contains_key(&p("b")));
        assert!(
            graph.edges[&p("b")].is_empty(),
            "{:?}",
            graph.edges[&p("b")]
        );
        assert!(!graph.files.contains_key(&p("t")));
    }
}
