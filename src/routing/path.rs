//! Request path normalisation (RFC 3986 §6.2.2), done once per request before routing so that
//! the path tollgate routes on is the path the backend reads. Pure; the rules:
//!
//! - the path must start with `/` (origin-form; the caller handles `*` and absolute-form);
//! - `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded; any other `%XX` is
//!   kept, with its hex digits upper-cased; a `%` not followed by two hex digits is refused;
//! - `%2F` (`/`) and `%5C` (`\`) are refused, or kept encoded (and so not a separator) with
//!   [`EncodedSlashes::Keep`]; a literal `\`, `%00`–`%1F`, `%7F` and raw control bytes are
//!   always refused;
//! - empty segments are merged (`//a` is `/a`), `.` and `..` segments are resolved (never above
//!   the root); a segment whose part before `;` is `.` or `..` counts as one (`/..;/admin`);
//! - case is significant and the query is not touched.
//!
//! For matching, [`strip_params`] removes `;` parameters from each segment, so `/admin;x`
//! matches a route `/admin`; the path forwarded keeps them.

use std::borrow::Cow;

/// What to do with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodedSlashes {
    /// Refuse the request (400): the safe default, since many backends decode them.
    #[default]
    Reject,
    /// Keep them encoded: they are then part of a segment, not separators.
    Keep,
}

/// Why a path was refused (each is a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotOriginForm,
    BadPercent,
    EncodedSeparator,
    Backslash,
    ControlByte,
}

impl PathError {
    /// The reason logged and sent with the 400.
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "request target is not origin-form, absolute-form or *",
            PathError::BadPercent => "malformed percent-encoding in the path",
            PathError::EncodedSeparator => {
                "encoded / or \\ in the path (limits.encoded_slashes = \"reject\")"
            }
            PathError::Backslash => "backslash in the path",
            PathError::ControlByte => "control character or NUL in the path",
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_control(b: u8) -> bool {
    b < 0x21 || b == 0x7f
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether a path is already in normal form and free of refused bytes, checked without
/// allocating: the common case on every request.
fn already_normal(p: &[u8]) -> bool {
    let mut prev = b'/';
    for (i, &b) in p.iter().enumerate() {
        if b == b'%' || b == b'\\' || is_control(b) {
            return false;
        }
        if prev == b'/' {
            if b == b'/' && i > 0 {
                return false;
            }
            if b == b'.' {
                // "." or ".." as a whole segment (or before ';')
                let rest = &p[i..];
                let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                let seg = &rest[..seg_end];
                let name = seg.split(|&c| c == b';').next().unwrap_or(seg);
                if name == b"." || name == b".." {
                    return false;
                }
            }
        }
        prev = b;
    }
    true
}

/// Normalise the path of a request target (without its query). `Cow::Borrowed` when it is
/// already normal.
pub fn normalize_path(path: &str, slashes: EncodedSlashes) -> Result<Cow<'_, str>, PathError> {
    let p = path.as_bytes();
    if p.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if already_normal(p) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. percent-decoding of unreserved characters, refusals
    let mut decoded = String::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        let b = p[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    p.get(i + 1).copied().and_then(hex),
                    p.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadPercent);
                };
                let v = h << 4 | l;
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else if v == b'/' || v == b'\\' {
                    if slashes == EncodedSlashes::Reject {
                        return Err(PathError::EncodedSeparator);
                    }
                    decoded.push_str(if v == b'/' { "%2F" } else { "%5C" });
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlByte);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    decoded.push('%');
                    decoded.push(HEX[usize::from(h)] as char);
                    decoded.push(HEX[usize::from(l)] as char);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if is_control(b) => return Err(PathError::ControlByte),
            _ => {
                // copy the run up to the next byte that needs a look, whole UTF-8 included
                let run = p[i..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\' || is_control(c))
                    .map_or(p.len(), |n| i + n);
                decoded.push_str(&path[i..run]);
                i = run;
            }
        }
    }
    // 2. merge slashes and resolve dot segments
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        let name = seg.split(';').next().unwrap_or(seg);
        match name {
            "" if seg.is_empty() => trailing = true,
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for seg in &out {
        norm.push('/');
        norm.push_str(seg);
    }
    if trailing || out.is_empty() {
        norm.push('/');
    }
    Ok(Cow::Owned(norm))
}

/// The path with each segment's `;` parameters removed, for matching routes:
/// `/admin;jsessionid=1/x` is matched as `/admin/x`.
pub fn strip_params(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or(seg));
    }
    Cow::Owned(out)
}

/// Is `path` at or under `prefix` (a prefix without a trailing `/`), so `strip` removes it?
pub fn strips(path: &str, prefix: &str) -> bool {
    !prefix.is_empty() && super::prefix_matches(prefix, path)
}

/// The path a route forwards: without the `strip` prefix (only at a segment boundary:
/// `/cart` strips `/cart` and `/cart/x`, not `/cartoon`), then under `prepend`. Both are
/// prefixes without a trailing `/` (`""` for the root). `None` when nothing changes.
pub fn rewrite(path: &str, strip: Option<&str>, prepend: Option<&str>) -> Option<String> {
    let stripped = match strip {
        Some(s) if strips(path, s) && path.len() == s.len() => "/",
        Some(s) if strips(path, s) => &path[s.len()..],
        _ => path,
    };
    match prepend {
        Some(p) if !p.is_empty() => Some(format!("{p}{stripped}")),
        _ if stripped.len() != path.len() => Some(stripped.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_rewrites_strip_at_segments_then_prepend() {
        for (path, strip, prepend, want) in [
            ("/cart/x", Some("/cart"), None, Some("/x")),
            ("/cart", Some("/cart"), None, Some("/")),
            ("/cart/", Some("/cart"), None, Some("/")),
            ("/cartoon", Some("/cart"), None, None),
            ("/other", Some("/cart"), None, None),
            ("/x", None, Some("/v2"), Some("/v2/x")),
            ("/cart/x", Some("/cart"), Some("/v2"), Some("/v2/x")),
            ("/", None, Some("/v2"), Some("/v2/")),
            ("/x", Some(""), Some(""), None),
        ] {
            assert_eq!(
                rewrite(path, strip, prepend).as_deref(),
                want,
                "{path} {strip:?} {prepend:?}"
            );
        }
    }

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p, EncodedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/admin",
            "/a/b/c/",
            "/.well-known/acme-challenge/x",
            "/a.b/..c/...",
            "/admin;x",
            "/caf\u{e9}",
        ] {
            assert!(
                matches!(normalize_path(p, EncodedSlashes::Reject), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn other_spellings_of_admin_normalise_to_admin() {
        for p in [
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "//admin",
            "///admin",
            "/./admin",
            "/public/../admin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/%2e%2e/admin",
            "/public/%2e%2e/admin",
            "/../../admin",
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/.;/admin",
            "/a/b/../../admin",
        ] {
            assert_eq!(norm(p).as_deref(), Ok("/admin"), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_trailing_slashes() {
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a/.").as_deref(), Ok("/a/"));
        assert_eq!(norm("/a//").as_deref(), Ok("/a/"));
        assert_eq!(norm("/..").as_deref(), Ok("/"));
        assert_eq!(norm("//").as_deref(), Ok("/"));
        assert_eq!(norm("/a/./b/").as_deref(), Ok("/a/b/"));
    }

    #[test]
    fn reserved_escapes_are_kept_upper_cased_and_case_is_significant() {
        assert_eq!(norm("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(norm("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(norm("/a%3bb").as_deref(), Ok("/a%3Bb"));
        assert_eq!(norm("/%C3%A9").as_deref(), Ok("/%C3%A9"));
        assert_eq!(norm("/%41dmin").as_deref(), Ok("/Admin"));
    }

    #[test]
    fn refused_spellings() {
        use PathError::*;
        for (p, e) in [
            ("/%2fadmin", EncodedSeparator),
            ("/admin%2f", EncodedSeparator),
            ("/admin%2F", EncodedSeparator),
            ("/public%2f..%2fadmin", EncodedSeparator),
            ("/public/..%5cadmin", EncodedSeparator),
            ("/\\admin", Backslash),
            ("/a\\..\\admin", Backslash),
            ("/%00admin", ControlByte),
            ("/a%0d%0ab", ControlByte),
            ("/a%7f", ControlByte),
            ("/a\u{1}", ControlByte),
            ("/%", BadPercent),
            ("/%4", BadPercent),
            ("/%zz", BadPercent),
            ("/%%32%65", BadPercent),
            ("admin", NotOriginForm),
            ("\\admin", NotOriginForm),
            ("", NotOriginForm),
            ("*", NotOriginForm),
        ] {
            assert_eq!(norm(p), Err(e), "{p}");
        }
    }

    #[test]
    fn encoded_slashes_can_be_kept_as_part_of_a_segment() {
        let keep = |p| normalize_path(p, EncodedSlashes::Keep).map(Cow::into_owned);
        assert_eq!(
            keep("/public%2f..%2fadmin").as_deref(),
            Ok("/public%2F..%2Fadmin")
        );
        assert_eq!(keep("/a%5cb").as_deref(), Ok("/a%5Cb"));
        assert_eq!(keep("/a\\b"), Err(PathError::Backslash));
        assert_eq!(keep("/%00"), Err(PathError::ControlByte));
    }

    #[test]
    fn params_are_stripped_for_matching_only() {
        assert_eq!(strip_params("/admin;x"), "/admin");
        assert_eq!(strip_params("/admin;x/y;z=1/"), "/admin/y/");
        assert_eq!(strip_params("/a"), "/a");
        assert!(matches!(strip_params("/a/b"), Cow::Borrowed(_)));
    }
}
