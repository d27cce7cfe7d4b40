//! Command-line options written `key=value,key=value` (`--disk path=a.img,readonly=on`),
//! deserialized into the same serde types a configuration file and the API use.
//!
//! Our own, small, rather than `serde-keyvalue` (crosvm's deserializer, republished): that
//! one reads a first part without `key=` as the first field (`--disk ./vm=1.img` became a
//! path), refuses brackets and quotes in unquoted values (`disk[1].img`), takes hex and
//! octal numbers, and its errors about a value do not name the key. Here a value is
//! everything after the first `=` up to the next comma; numbers are decimal; every error
//! about a value says `key=value`.

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

/// Errors of a `key=value` option.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("{key}= needs a value")]
    Empty { key: String },
    #[error("{key}={value}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    /// serde's own (unknown field `x`, duplicate field `x`) or the type's checks.
    #[error("{0}")]
    Other(String),
}

impl de::Error for KeyValueError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        KeyValueError::Other(msg.to_string())
    }
}

impl KeyValueError {
    /// An error the value's visitor raised, said about `key=value`.
    fn about(self, key: &str, value: &str) -> Self {
        match self {
            KeyValueError::Other(reason) => KeyValueError::Value {
                key: key.to_string(),
                value: value.to_string(),
                reason,
            },
            e => e,
        }
    }
}

/// Parses `spec` into `T`. A key is `[a-z0-9_]+`; each part must be `key=value` with a
/// non-empty value; a value holds no comma.
pub fn from_key_values<T: DeserializeOwned>(spec: &str) -> Result<T, KeyValueError> {
    let mut pairs = Vec::new();
    for part in spec.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(KeyValueError::NotKeyValue(part.to_string()));
        };
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(KeyValueError::NotKeyValue(part.to_string()));
        }
        if value.is_empty() {
            return Err(KeyValueError::Empty {
                key: key.to_string(),
            });
        }
        pairs.push((
            key.to_string(),
            Value {
                key: key.to_string(),
                value: value.to_string(),
            },
        ));
    }
    T::deserialize(de::value::MapDeserializer::new(pairs.into_iter()))
}

/// One value, with its key for errors.
#[derive(Debug)]
struct Value {
    key: String,
    value: String,
}

impl Value {
    fn number<N: std::str::FromStr>(&self, what: &str) -> Result<N, KeyValueError> {
        self.value.parse().map_err(|_| KeyValueError::Value {
            key: self.key.clone(),
            value: self.value.clone(),
            reason: format!("not {what}"),
        })
    }
}

impl IntoDeserializer<'_, KeyValueError> for Value {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! numbers {
    ($($method:ident $visit:ident $ty:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KeyValueError> {
            let n: $ty = self.number($what)?;
            visitor.$visit::<KeyValueError>(n).map_err(|e| e.about(&self.key, &self.value))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = KeyValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KeyValueError> {
        visitor
            .visit_str::<KeyValueError>(&self.value)
            .map_err(|e| e.about(&self.key, &self.value))
    }

    numbers! {
        deserialize_u8 visit_u8 u8, "a number in 0..=255";
        deserialize_u16 visit_u16 u16, "a number in 0..=65535";
        deserialize_u32 visit_u32 u32, "a number in 0..=4294967295";
        deserialize_u64 visit_u64 u64, "a number in 0..=18446744073709551615";
        deserialize_i32 visit_i32 i32, "a number";
        deserialize_i64 visit_i64 i64, "a number";
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, KeyValueError> {
        visitor.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, KeyValueError> {
        let value: de::value::StrDeserializer<'_, KeyValueError> =
            self.value.as_str().into_deserializer();
        de::Deserializer::deserialize_enum(value, name, variants, visitor)
            .map_err(|e| e.about(&self.key, &self.value))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i128 u128 f32 f64 char str string bytes byte_buf unit unit_struct
        newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    struct Opts {
        path: std::path::PathBuf,
        #[serde(default)]
        count: Option<u16>,
        #[serde(default)]
        kind: Option<Kind>,
        #[serde(default)]
        name: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        IoUring,
        Sync,
    }

    fn parse(s: &str) -> Result<Opts, String> {
        from_key_values::<Opts>(s).map_err(|e| e.to_string())
    }

    #[test]
    fn values_are_everything_after_the_first_equals() {
        let o = parse("path=./vm=1.img,count=12,kind=io_uring,name=disk[1] 'o\"").unwrap();
        assert_eq!(o.path, std::path::Path::new("./vm=1.img"));
        assert_eq!((o.count, o.kind), (Some(12), Some(Kind::IoUring)));
        assert_eq!(o.name.as_deref(), Some("disk[1] 'o\""));
    }

    #[test]
    fn errors_name_the_key_and_value() {
        for (spec, says) in [
            (
                "path=/x,count=0x10",
                "count=0x10: not a number in 0..=65535",
            ),
            ("path=/x,count=70000", "count=70000: not a number"),
            ("path=/x,count=-1", "count=-1: not a number"),
            ("path=/x,kind=aio", "kind=aio: unknown variant `aio`"),
            ("path=/x,colour=blue", "unknown field `colour`"),
            ("path=/x,path=/y", "duplicate field `path`"),
            ("path=", "path= needs a value"),
            ("/x.img", "\"/x.img\" is not key=value"),
            (" path=/x", "\" path=/x\" is not key=value"),
            ("=/x", "\"=/x\" is not key=value"),
            ("path=/x,", "\"\" is not key=value"),
            ("count=2", "missing field `path`"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }
}
