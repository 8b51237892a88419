//! What a route does besides choosing its pool (path rewrites, the Host sent upstream, a
//! redirect, who may use it), checked once for both places a route is declared: a file
//! route's keys (`strip = "/cart"`) and a Consul tag's words (`strip=/cart`). Each checker
//! returns the value to keep, or what the value must be (the caller names the option).

/// A path prefix (`strip`, `prepend`): absolute, in normal form, no query; kept without a
/// trailing `/`.
pub fn prefix(v: &str) -> Result<String, String> {
    let normal = matches!(
        crate::routing::path::normalize_path(v, crate::routing::path::EncodedSlashes::Reject),
        Ok(std::borrow::Cow::Borrowed(_))
    );
    if !v.starts_with('/') || !normal || v.contains(['?', '#', ';']) {
        return Err("a path prefix such as /api (absolute, in normal form)".into());
    }
    Ok(v.trim_end_matches('/').to_string())
}

/// The Host sent upstream: a host name with an optional port, or `dst` (the backend's
/// address); kept lower-case.
pub fn host(v: &str) -> Result<String, String> {
    let name = match v.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => v,
    };
    if v != "dst" && (name.starts_with("*.") || super::check_host_name(name).is_err()) {
        return Err("a host name (with an optional port) or `dst`".into());
    }
    Ok(v.to_ascii_lowercase())
}

/// The variables a redirect target may hold: the request's path and query (normalised, so
/// never `//host`), and its host (normalised, without the port).
pub const REDIRECT_VARIABLES: [&str; 2] = ["$path", "$host"];

/// A redirect: a 3xx status and a target, absolute (`https://…`) or a path (`/…`), which may
/// hold `$path` and `$host`.
pub fn redirect(status: u16, to: &str) -> Result<(u16, String), String> {
    if !(300..400).contains(&status) || (304..=306).contains(&status) {
        return Err(format!(
            "{status} is not a redirect status (301, 302, 303, 307 or 308)"
        ));
    }
    // checked with the variables filled in as a request would fill them
    let sample = to.replace("$host", "example.com").replace("$path", "/p?q");
    let absolute = (to.starts_with("https://") || to.starts_with("http://"))
        .then(|| sample.split_once("://").map_or("", |(_, rest)| rest));
    let ok = match absolute {
        // an authority, then nothing or a path: `https://$host$path`
        Some(rest) => {
            !rest.is_empty() && !rest.starts_with('/') && sample.parse::<http::Uri>().is_ok()
        }
        // a path, and never `//host` (a browser reads that as another host): `$path` starts
        // with one `/`, so it may only follow text
        None => {
            to.starts_with('/')
                && !to.starts_with("//")
                && !to.starts_with("/$path")
                && sample.parse::<http::Uri>().is_ok()
        }
    };
    if !ok || to.contains(['\r', '\n', ' ']) {
        return Err(format!(
            "`{to}`: a URL (https://example.com$path) or a path (/new$path); variables: {}",
            REDIRECT_VARIABLES.join(", ")
        ));
    }
    Ok((status, to.to_string()))
}

/// Client networks (`allow`, `deny`): CIDRs or addresses, at least one; an `ip:` prefix (as
/// Fabio writes them) is dropped.
pub fn networks<'a>(nets: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for n in nets {
        let n = n.strip_prefix("ip:").unwrap_or(n);
        n.parse::<super::cidr::Cidr>()?;
        out.push(n.to_string());
    }
    if out.is_empty() {
        return Err("name networks, e.g. 10.0.0.0/8".into());
    }
    Ok(out)
}

/// `allow` and `deny` together is a contradiction (which would win?).
pub const ALLOW_AND_DENY: &str = "options `allow` and `deny` cannot be used together";

/// Fill a redirect target in for one request: `pq` is its normalised path and query, `host`
/// its normalised host (an IPv6 address gets its brackets back).
pub fn redirect_location(to: &str, pq: &str, host: &str) -> String {
    let host = if host.contains(':') {
        std::borrow::Cow::Owned(format!("[{host}]"))
    } else {
        std::borrow::Cow::Borrowed(host)
    };
    to.replace("$path", pq).replace("$host", &host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_absolute_normal_paths() {
        assert_eq!(prefix("/cart/").unwrap(), "/cart");
        for bad in ["cart", "/a//b", "/a/../b", "/a?x", "/a;b", "/%2F"] {
            assert!(prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_are_names_with_ports_or_dst() {
        assert_eq!(host("API.internal:8080").unwrap(), "api.internal:8080");
        assert_eq!(host("dst").unwrap(), "dst");
        for bad in ["*.x.test", "a b", "a\r\nx: y", "", "a:port"] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redirects_need_a_3xx_and_a_url_or_path_that_cannot_leave_the_site_by_accident() {
        assert!(redirect(301, "https://new.test$path").is_ok());
        assert!(redirect(308, "https://$host/new$path").is_ok());
        assert!(redirect(302, "/maintenance").is_ok());
        assert!(redirect(301, "/new$path").is_ok());
        for (status, to) in [
            (200, "https://a.test/"),
            (304, "https://a.test/"),
            (301, "ftp://a.test/"),
            (301, "https://"),
            (301, "https:///path"),
            (301, "//evil.test/"),
            (301, "$path"),
            (301, "/$path"),
            (301, "https://a.test/\r\nSet-Cookie: x"),
            (301, "new.test"),
        ] {
            assert!(redirect(status, to).is_err(), "{status} {to:?}");
        }
    }

    #[test]
    fn locations_fill_path_and_host() {
        assert_eq!(
            redirect_location("https://$host/v2$path", "/a?b=1", "x.test"),
            "https://x.test/v2/a?b=1"
        );
        assert_eq!(
            redirect_location("https://$host$path", "/", "2001:db8::1"),
            "https://[2001:db8::1]/"
        );
    }

    #[test]
    fn networks_take_fabios_prefix_and_refuse_garbage() {
        assert_eq!(
            networks(["ip:10.0.0.0/8", "192.0.2.1"]).unwrap(),
            ["10.0.0.0/8", "192.0.2.1"]
        );
        assert!(networks([]).is_err());
        assert!(networks(["10.0.0.0/33"]).is_err());
    }
}
