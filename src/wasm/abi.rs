//! The proxy-wasm ABI's numbers and encodings (proxy-wasm/spec, abi-versions v0.2.0 and v0.2.1).
//! Pure: no wasmtime here, so the encodings are unit-tested exactly.

/// Hostcall results. Only values the official SDKs know are ever returned: the Rust SDK panics
/// on a status it does not expect, and a panic poisons the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// `proxy_on_*` stream callbacks return 0 to continue; anything else pauses.
pub const ACTION_CONTINUE: i32 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    CallResponseHeaders,
    CallResponseTrailers,
}

impl MapType {
    pub fn from_i32(v: i32) -> Option<MapType> {
        Some(match v {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::CallResponseHeaders,
            7 => MapType::CallResponseTrailers,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    CallResponseBody,
    GrpcReceive,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub fn from_i32(v: i32) -> Option<BufferType> {
        Some(match v {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::CallResponseBody,
            5 => BufferType::GrpcReceive,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

pub const STREAM_REQUEST: i32 = 0;
pub const STREAM_RESPONSE: i32 = 1;

/// proxy_log levels, mapped onto tracing.
pub const LOG_TRACE: i32 = 0;
pub const LOG_DEBUG: i32 = 1;
pub const LOG_INFO: i32 = 2;
pub const LOG_WARN: i32 = 3;
pub const LOG_ERROR: i32 = 4;
pub const LOG_CRITICAL: i32 = 5;

/// Metric kinds: 0 counter, 1 gauge, 2 histogram.
pub const METRIC_COUNTER: i32 = 0;
pub const METRIC_HISTOGRAM: i32 = 2;

/// Serialize a header map as the ABI wants it: a u32 count, then a u32 length for every key
/// and value, then each key and value followed by a NUL (the lengths do not count the NUL).
pub fn serialize_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut size = 4 + pairs.len() * 8;
    for (k, v) in pairs {
        size += k.as_ref().len() + v.as_ref().len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Parse a map a plugin wrote. Every length is checked against the buffer, so a hostile
/// count or length gives an error, never a panic or a huge allocation.
/// Header pairs as bytes.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub fn deserialize_map(buf: &[u8]) -> Result<Pairs, &'static str> {
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let word = |at: usize| -> Result<usize, &'static str> {
        let b = buf.get(at..at + 4).ok_or("map is truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    // Each pair needs at least 8 bytes of lengths and 2 NULs.
    if count > buf.len() / 10 + 1 {
        return Err("map count is larger than the map");
    }
    let mut lens = Vec::with_capacity(count);
    for i in 0..count {
        lens.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut take = |n: usize| -> Result<Vec<u8>, &'static str> {
        let end = at.checked_add(n).ok_or("map length overflows")?;
        let s = buf.get(at..end).ok_or("map is truncated")?.to_vec();
        if buf.get(end) != Some(&0) {
            return Err("map entry is not NUL-terminated");
        }
        at = end + 1;
        Ok(s)
    };
    let mut out = Vec::with_capacity(count);
    for (kl, vl) in lens {
        let k = take(kl)?;
        let v = take(vl)?;
        out.push((k, v));
    }
    Ok(out)
}

/// Bytes as text, invalid UTF-8 replaced (`String::from_utf8_lossy`), but checked with
/// `str::from_utf8` first: valid text, nearly always, takes its faster path (a token in a
/// header is hundreds of bytes, read on every request).
pub fn lossy(b: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

/// A header name as the maps match it, lower-case (copied only when it has upper case:
/// most plugins already send names lower-case).
pub fn lower(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// A property path as sent by the SDKs: segments joined (and possibly ended) by NUL.
pub fn split_path(buf: &str) -> Vec<&str> {
    let trimmed = buf.strip_suffix('\0').unwrap_or(buf);
    trimmed.split('\0').collect()
}

/// Call `f` with the segments of a property path (`split_path`'s), without allocating for
/// the paths properties have (up to 8 segments).
pub fn with_path<R>(buf: &str, f: impl FnOnce(&[&str]) -> R) -> R {
    let trimmed = buf.strip_suffix('\0').unwrap_or(buf);
    let mut segs = [""; 8];
    let mut n = 0;
    for s in trimmed.split('\0') {
        if n == segs.len() {
            return f(&split_path(buf));
        }
        segs[n] = s;
        n += 1;
    }
    f(&segs[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_serialization_matches_the_abi_layout() {
        let m = serialize_map(&[("a", "bc"), (":path", "/")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0];
        want.extend_from_slice(b"a\0bc\0:path\0/\0");
        assert_eq!(m, want);
        let back = deserialize_map(&m).unwrap();
        assert_eq!(back[0], (b"a".to_vec(), b"bc".to_vec()));
        assert_eq!(back[1], (b":path".to_vec(), b"/".to_vec()));
    }

    #[test]
    fn empty_map_is_a_zero_count() {
        let m = serialize_map::<&str, &str>(&[]);
        assert_eq!(m, vec![0, 0, 0, 0]);
        assert!(deserialize_map(&m).unwrap().is_empty());
        assert!(deserialize_map(&[]).unwrap().is_empty());
    }

    #[test]
    fn hostile_maps_are_errors_not_panics() {
        // a count of 4 billion in a 4-byte buffer
        assert!(deserialize_map(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // one pair whose key length runs past the end
        let mut m = vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        m.extend_from_slice(b"k\0\0");
        assert!(deserialize_map(&m).is_err());
        // missing NUL terminator
        let mut m = serialize_map(&[("k", "v")]);
        let n = m.len();
        m[n - 1] = b'x';
        assert!(deserialize_map(&m).is_err());
        // truncated length table
        assert!(deserialize_map(&[2, 0, 0, 0, 1, 0]).is_err());
    }

    #[test]
    fn property_paths_split_on_nul() {
        assert_eq!(split_path("request\0path"), vec!["request", "path"]);
        assert_eq!(split_path("plugin_name\0"), vec!["plugin_name"]);
        assert_eq!(split_path("source\0port"), vec!["source", "port"]);
        let nine = "a\0b\0c\0d\0e\0f\0g\0h\0i";
        for p in ["request\0path", "plugin_name\0", "source\0port", nine, ""] {
            with_path(p, |segs| {
                assert_eq!(segs, split_path(p).as_slice(), "{p:?}")
            });
        }
    }
}
