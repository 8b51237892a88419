//! `[[plugin]]` and the plugin references of vhosts and routes.

use super::*;

pub(super) fn plugins(
    cx: &mut Ctx,
    raw: &BTreeMap<String, Spanned<crate::config::raw::RawPlugin>>,
) -> BTreeMap<String, PluginSpec> {
    let mut out = BTreeMap::new();
    for (name, sp) in raw {
        let p = sp.get_ref();
        let opt = |o: &str| format!("plugin.{name}.{o}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            cx.err(
                sp.span(),
                format!("plugin.{name}"),
                "a plugin name may hold only letters, digits, - _ and .",
            );
        }
        let json = |cx: &mut Ctx, v: &Option<toml::Value>, o: &str| -> Vec<u8> {
            match v {
                None => Vec::new(),
                Some(toml::Value::String(s)) => s.clone().into_bytes(),
                Some(v) => serde_json::to_vec(v).unwrap_or_else(|e| {
                    cx.err(sp.span(), opt(o), format!("cannot be written as JSON: {e}"));
                    Vec::new()
                }),
            }
        };
        let config = json(cx, &p.config, "config");
        let vm_config = json(cx, &p.vm_config, "vm_config");
        let on_error = cx.choice(
            &p.on_error,
            &opt("on_error"),
            &[
                ("fail_closed", OnError::FailClosed),
                ("fail_open", OnError::FailOpen),
            ],
        );
        let cpu_deadline = cx.duration_in(
            &p.cpu_deadline,
            &opt("cpu_deadline"),
            defaults::plugin::CPU_DEADLINE,
            Duration::from_millis(1),
            Duration::from_secs(10),
        );
        let max_memory = cx.size(
            &p.max_memory,
            &opt("max_memory"),
            defaults::plugin::MAX_MEMORY,
        );
        if !(1 << 16..=4 << 30).contains(&max_memory) {
            let span = p.max_memory.as_ref().map(|m| m.span()).unwrap_or(0..0);
            cx.err(
                span,
                opt("max_memory"),
                "must be between 64k (one wasm page) and 4g",
            );
        }
        out.insert(
            name.clone(),
            PluginSpec {
                name: name.clone(),
                file: cx.path(p.file.get_ref()),
                config,
                vm_config,
                vm_id: p.vm_id.clone().unwrap_or_else(|| name.clone()),
                root_id: p.root_id.clone().unwrap_or_default(),
                on_error,
                cpu_deadline,
                max_memory,
                origin: cx.origin(sp.span()),
            },
        );
    }
    out
}

/// Names in a `plugins = [...]` list, each checked against `[plugin.NAME]`.
pub(super) fn plugin_refs(
    cx: &mut Ctx,
    raw: &[Spanned<String>],
    option: &str,
    plugins: &BTreeMap<String, PluginSpec>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in raw {
        let n = r.get_ref();
        if !plugins.contains_key(n) {
            let known: Vec<&str> = plugins.keys().map(String::as_str).collect();
            cx.err(
                r.span(),
                option,
                format!(
                    "no plugin named `{n}` (defined plugins: {})",
                    if known.is_empty() {
                        "none; add [plugin.NAME] with file = \"….wasm\"".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        } else if out.contains(n) {
            cx.err(r.span(), option, format!("`{n}` is listed twice"));
        } else {
            out.push(n.clone());
        }
    }
    out
}
