//! `[admin]`: the admin listener and its token.

use super::*;

pub(super) fn admin(cx: &mut Ctx, raw: &crate::config::raw::RawAdmin) -> AdminSettings {
    let default_addr = defaults::admin::ADDRESS;
    let address = match &raw.address {
        None => default_addr,
        Some(a) => match a.get_ref().parse::<SocketAddr>() {
            Ok(sa) => sa,
            Err(_) => {
                cx.err(
                    a.span(),
                    "admin.address",
                    format!(
                        "`{}` is not an IP:port address (e.g. 127.0.0.1:9901)",
                        a.get_ref()
                    ),
                );
                default_addr
            }
        },
    };
    let token = match (&raw.token, &raw.token_file) {
        (Some(_), Some(f)) => {
            cx.err(
                f.span(),
                "admin.token_file",
                "set admin.token or admin.token_file, not both",
            );
            None
        }
        (Some(t), None) => {
            if t.get_ref().trim().len() < 16 {
                cx.err(
                    t.span(),
                    "admin.token",
                    "is too short to be a secret: use at least 16 characters (e.g. `openssl rand -hex 32`)",
                );
            }
            Some(AdminToken::Inline(t.get_ref().trim().to_string()))
        }
        (None, Some(f)) => Some(AdminToken::File {
            path: cx.path(f.get_ref()),
            origin: cx.origin(f.span()),
        }),
        (None, None) => None,
    };
    let enabled = raw.enabled.unwrap_or(true);
    if enabled && token.is_none() && !address.ip().is_loopback() {
        let span = raw.address.as_ref().map(|a| a.span()).unwrap_or(0..0);
        cx.err(
            span,
            "admin.address",
            format!(
                "{address} is reachable from other hosts, so the admin API needs a token: set admin.token or admin.token_file"
            ),
        );
    }
    AdminSettings {
        enabled,
        address,
        token,
    }
}
