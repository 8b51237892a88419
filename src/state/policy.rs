//! Who may claim which host and path through Consul: each file vhost's `consul_routes` and
//! the `[[consul.allow]]` rules. Pure: judged while the file's and Consul's routes are merged.
//!
//! A claim under a host a file vhost serves (by name or by wildcard, or a route without a
//! host, which lands on the default vhost) needs that vhost's `consul_routes`; when there
//! are `[[consul.allow]]` rules, every claim also needs one of them. Without rules, services
//! may claim hosts no file vhost serves.

use crate::config::{ClaimRule, ConsulRoutes, Vhost};
use crate::discovery::DiscoveredRoute;
use crate::routing::prefix_matches;

/// Does `pattern` (`*` matches any run of characters, even none) match all of `s`?
pub(crate) fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // where the last `*` was, and how much of `s` it has taken
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            // let the last `*` take one more byte
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

pub(crate) use crate::routing::name_covers as host_matches;

fn rule_allows(r: &ClaimRule, c: &DiscoveredRoute) -> bool {
    r.hosts.iter().any(|h| host_matches(h, &c.host))
        && r.paths.iter().any(|p| prefix_matches(p, &c.path))
        && r.services.iter().any(|s| glob(s, &c.service))
        && (r.tags.is_empty() || r.tags.iter().any(|t| c.service_tags.contains(t)))
}

/// Whether `claim` may be applied, and by what (`Ok`), or why not (`Err`). `file_vhost` is
/// the file vhost that serves the claimed host, if one does.
pub(crate) fn judge(
    rules: &[ClaimRule],
    claim: &DiscoveredRoute,
    file_vhost: Option<&Vhost>,
) -> Result<String, String> {
    let mut by = Vec::new();
    if let Some(v) = file_vhost {
        let name = v.label();
        match &v.consul_routes {
            ConsulRoutes::Refused => {
                return Err(format!(
                    "vhost {name} ({}) does not take Consul routes (its consul_routes is not set)",
                    v.origin
                ))
            }
            ConsulRoutes::Services(list) if !list.iter().any(|p| glob(p, &claim.service)) => {
                return Err(format!(
                    "service {} is not in the consul_routes of vhost {name} ({})",
                    claim.service, v.origin
                ))
            }
            _ => by.push(format!("the consul_routes of vhost {name} ({})", v.origin)),
        }
    }
    if rules.is_empty() {
        if file_vhost.is_none() {
            by.push("a host no file vhost serves (no consul.allow rules)".into());
        }
        return Ok(by.join(" and "));
    }
    match rules
        .iter()
        .enumerate()
        .find(|(_, r)| rule_allows(r, claim))
    {
        Some((i, r)) => {
            by.push(format!("consul.allow[{i}] ({})", r.origin));
            Ok(by.join(" and "))
        }
        None => Err(format!(
            "no consul.allow rule lets service {} claim {}{}",
            claim.service,
            if claim.host.is_empty() {
                "any host"
            } else {
                &claim.host
            },
            claim.path
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;

    #[test]
    fn globs_match_whole_names() {
        for (p, s, want) in [
            ("*", "anything", true),
            ("*", "", true),
            ("web-*", "web-shop", true),
            ("web-*", "web-", true),
            ("web-*", "api-web-shop", false),
            ("*-api", "pay-api", true),
            ("*-api", "pay-api-v2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("shop", "shop", true),
            ("shop", "shop2", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(p, s), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn host_patterns_cover_exact_names_subdomains_and_any() {
        for (p, h, want) in [
            ("*", "a.test", true),
            ("*", "", true),
            ("*.apps.test", "shop.apps.test", true),
            ("*.apps.test", "a.b.apps.test", true),
            ("*.apps.test", "apps.test", false),
            ("*.apps.test", "evilapps.test", false),
            ("*.apps.test", "", false),
            ("a.test", "a.test", true),
            ("a.test", "b.a.test", false),
            ("a.test", "", false),
        ] {
            assert_eq!(host_matches(p, h), want, "{p} ~ {h}");
        }
    }

    fn claim(host: &str, path: &str, service: &str, tags: &[&str]) -> DiscoveredRoute {
        DiscoveredRoute {
            host: host.into(),
            path: path.into(),
            service: service.into(),
            tag: format!("tollgate.route={host}{path}"),
            index: 1,
            service_tags: tags.iter().map(|t| t.to_string()).collect(),
            options: Default::default(),
            refused: None,
        }
    }

    fn rule(hosts: &[&str], paths: &[&str], services: &[&str], tags: &[&str]) -> ClaimRule {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        ClaimRule {
            hosts: v(hosts),
            paths: v(paths),
            services: v(services),
            tags: v(tags),
            origin: Origin {
                file: "t.toml".into(),
                line: 30,
            },
        }
    }

    fn vhost(name: &str, consul_routes: ConsulRoutes) -> Vhost {
        Vhost {
            acme: false,
            names: vec![name.into()],
            default: false,
            cert: None,
            redirect_https: true,
            plugins: Vec::new(),
            routes: Vec::new(),
            consul_routes,
            headers: Default::default(),
            request_headers: Default::default(),
            response_headers: Default::default(),
            error_pages: Default::default(),
            origin: Origin {
                file: "t.toml".into(),
                line: 5,
            },
        }
    }

    #[test]
    fn without_rules_new_hosts_are_open_and_file_vhosts_closed() {
        let c = claim("shop.test", "/", "shop", &[]);
        assert!(judge(&[], &c, None)
            .unwrap()
            .contains("no file vhost serves"));
        let a = vhost("a.test", ConsulRoutes::Refused);
        let e = judge(&[], &claim("a.test", "/admin", "rogue", &[]), Some(&a)).unwrap_err();
        assert!(
            e.contains("vhost a.test (t.toml:5) does not take Consul routes"),
            "{e}"
        );
        let open = vhost("a.test", ConsulRoutes::Any);
        assert!(judge(&[], &claim("a.test", "/x", "any", &[]), Some(&open)).is_ok());
        let listed = vhost("a.test", ConsulRoutes::Services(vec!["web-*".into()]));
        assert!(judge(&[], &claim("a.test", "/x", "web-blog", &[]), Some(&listed)).is_ok());
        let e = judge(&[], &claim("a.test", "/x", "api", &[]), Some(&listed)).unwrap_err();
        assert!(
            e.contains("service api is not in the consul_routes of vhost a.test"),
            "{e}"
        );
    }

    #[test]
    fn with_rules_every_claim_needs_one() {
        let rules = [
            rule(&["*.apps.test"], &["/"], &["web-*"], &["team=web"]),
            rule(&["b.test"], &["/blog"], &["blog"], &[]),
        ];
        let ok = judge(
            &rules,
            &claim("shop.apps.test", "/", "web-shop", &["team=web", "v2"]),
            None,
        )
        .unwrap();
        assert_eq!(ok, "consul.allow[0] (t.toml:30)");
        for (c, what) in [
            (
                claim("shop.apps.test", "/", "web-shop", &["team=pay"]),
                "no tag",
            ),
            (
                claim("shop.apps.test", "/", "api", &["team=web"]),
                "other service",
            ),
            (
                claim("shop.test", "/", "web-shop", &["team=web"]),
                "other host",
            ),
            (claim("", "/", "web-shop", &["team=web"]), "any host"),
            (claim("b.test", "/blogger", "blog", &[]), "not a segment"),
            (claim("b.test", "/", "blog", &[]), "above the prefix"),
        ] {
            let e = judge(&rules, &c, None).unwrap_err();
            assert!(
                e.starts_with("no consul.allow rule lets service"),
                "{what}: {e}"
            );
        }
        assert!(judge(&rules, &claim("b.test", "/blog/2024", "blog", &[]), None).is_ok());
        // a file vhost must opt in as well
        let b = vhost("b.test", ConsulRoutes::Refused);
        assert!(judge(&rules, &claim("b.test", "/blog", "blog", &[]), Some(&b)).is_err());
        let b = vhost("b.test", ConsulRoutes::Any);
        let by = judge(&rules, &claim("b.test", "/blog", "blog", &[]), Some(&b)).unwrap();
        assert_eq!(
            by,
            "the consul_routes of vhost b.test (t.toml:5) and consul.allow[1] (t.toml:30)"
        );
    }
}
