//! The guest command line: `testguest.plan=NAME`, `key=value` options for the plans,
//! and `virtio_mmio.device=` entries, separated by spaces (no quoting).

/// The option that selects the test plan.
pub const PLAN_KEY: &str = "testguest.plan";

#[derive(Clone, Copy, Debug)]
pub struct Cmdline {
    text: &'static str,
}

impl Cmdline {
    pub fn new(text: &'static str) -> Self {
        Cmdline { text }
    }

    /// Every `key=value` (or bare `key`) word, in order.
    pub fn options(&self) -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
        self.text
            .split_ascii_whitespace()
            .map(|word| match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            })
    }

    /// Every value given for `key`, in order (for repeatable options).
    pub fn values(&self, key: &'static str) -> impl Iterator<Item = &'static str> {
        self.options()
            .filter(move |(k, _)| *k == key)
            .filter_map(|(_, v)| v)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &'static str) -> Option<&'static str> {
        self.values(key).last()
    }

    /// A numeric option (decimal or 0x hex); `Err` carries the text that did not parse.
    pub fn number(&self, key: &'static str) -> Result<Option<u64>, &'static str> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_number(v).map(Some).ok_or(v),
        }
    }

    /// True if `key` is present bare or set to 1/y/yes/on/true.
    pub fn flag(&self, key: &'static str) -> bool {
        self.options()
            .filter(|(k, _)| *k == key)
            .last()
            .is_some_and(|(_, v)| matches!(v, None | Some("1" | "y" | "yes" | "on" | "true")))
    }

    pub fn plan(&self) -> Option<&'static str> {
        self.get(PLAN_KEY)
    }
}

/// Decimal, or hex with a 0x prefix.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A number with an optional K/M/G suffix (binary units), as Linux's `memparse`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}
