//! The proxy-wasm ABI's hostcalls (the `env` module), one function each; `super::proxy`
//! is their registration table.

use super::*;

/// Add, replace or remove one header (the three header-map edit hostcalls).
pub(super) fn edit(c: &mut C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32, mode: Mode) -> R<i32> {
    let Some(t) = map_type(t) else {
        return Ok(st(Status::BadArgument));
    };
    // read in place: no copy of the name or the value before the header map's own
    let (mem, state) = split(c)?;
    let key = abi::lossy(at(mem, kp, kn)?);
    let value = if mode == Mode::Remove {
        &[][..]
    } else {
        at(mem, vp, vn)?
    };
    Ok(st(set_header(state, t, &key, value, mode)))
}

pub(super) fn proxy_log(mut c: C, level: i32, p: i32, n: i32) -> R<i32> {
    let msg = read_str(&mut c, p, n)?;
    if level >= abi::LOG_INFO {
        c.data_mut().note_startup_log(&msg);
    }
    let plugin = c.data().spec.name.as_str();
    match level {
        abi::LOG_TRACE => tracing::trace!(plugin, "{msg}"),
        abi::LOG_DEBUG => tracing::debug!(plugin, "{msg}"),
        abi::LOG_INFO => tracing::info!(plugin, "{msg}"),
        abi::LOG_WARN => tracing::warn!(plugin, "{msg}"),
        abi::LOG_ERROR | abi::LOG_CRITICAL => tracing::error!(plugin, "{msg}"),
        _ => tracing::info!(plugin, level, "{msg}"),
    }
    Ok(st(Status::Ok))
}

pub(super) fn proxy_get_log_level(mut c: C, ret: i32) -> R<i32> {
    use tracing::level_filters::LevelFilter;
    let lvl = match LevelFilter::current() {
        LevelFilter::TRACE => abi::LOG_TRACE,
        LevelFilter::DEBUG => abi::LOG_DEBUG,
        LevelFilter::INFO => abi::LOG_INFO,
        LevelFilter::WARN => abi::LOG_WARN,
        LevelFilter::ERROR => abi::LOG_ERROR,
        _ => abi::LOG_CRITICAL,
    };
    write_u32(&mut c, ret, lvl as u32)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_get_current_time_nanoseconds(mut c: C, ret: i32) -> R<i32> {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    write_u64(&mut c, ret, ns)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_set_tick_period_milliseconds(mut c: C, ms: i32) -> R<i32> {
    let ms = ms as u32;
    c.data_mut().tick_period = (ms > 0).then(|| Duration::from_millis(ms.max(10) as u64));
    Ok(st(Status::Ok))
}

pub(super) fn proxy_set_effective_context(mut c: C, id: i32) -> R<i32> {
    let id = id as u32;
    let d = c.data_mut();
    if id == ROOT_ID || (id != 0 && id == d.stream_ctx) {
        d.effective = id;
        Ok(st(Status::Ok))
    } else {
        Ok(st(Status::BadArgument))
    }
}

pub(super) fn proxy_get_buffer_bytes(
    mut c: C,
    t: i32,
    start: i32,
    max: i32,
    rp: i32,
    rl: i32,
) -> R<i32> {
    let Some(t) = BufferType::from_i32(t) else {
        return Ok(st(Status::BadArgument));
    };
    let d = c.data();
    let buf: Option<&[u8]> = match t {
        BufferType::RequestBody => d.stream().map(|s| s.req_body.as_slice()),
        BufferType::ResponseBody => d.stream().map(|s| s.resp_body.as_slice()),
        BufferType::CallResponseBody => d.callout_response.as_ref().map(|r| r.body.as_slice()),
        BufferType::PluginConfiguration => Some(d.spec.config.as_slice()),
        BufferType::VmConfiguration => Some(d.spec.vm_config.as_slice()),
        _ => None,
    };
    let Some(buf) = buf else {
        return Ok(st(Status::NotFound));
    };
    let start = (start as u32 as usize).min(buf.len());
    let end = start.saturating_add(max as u32 as usize).min(buf.len());
    let out = buf[start..end].to_vec();
    give(&mut c, &out, rp, rl)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_set_buffer_bytes(
    mut c: C,
    t: i32,
    start: i32,
    size: i32,
    p: i32,
    n: i32,
) -> R<i32> {
    let Some(t) = BufferType::from_i32(t) else {
        return Ok(st(Status::BadArgument));
    };
    let bytes = read(&mut c, p, n)?;
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(st(Status::NotFound));
    };
    let buf = match t {
        BufferType::RequestBody => &mut s.req_body,
        BufferType::ResponseBody => &mut s.resp_body,
        _ => return Ok(st(Status::NotFound)),
    };
    let start = (start as u32 as usize).min(buf.len());
    let end = start.saturating_add(size as u32 as usize).min(buf.len());
    buf.splice(start..end, bytes);
    Ok(st(Status::Ok))
}

pub(super) fn proxy_get_header_map_pairs(mut c: C, t: i32, rp: i32, rl: i32) -> R<i32> {
    let Some(t) = map_type(t) else {
        return Ok(st(Status::BadArgument));
    };
    let Some(pairs) = c.data().map_pairs(t) else {
        return Ok(st(Status::NotFound));
    };
    let bytes = abi::serialize_map(&pairs);
    give(&mut c, &bytes, rp, rl)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_set_header_map_pairs(mut c: C, t: i32, p: i32, n: i32) -> R<i32> {
    let Some(t) = map_type(t) else {
        return Ok(st(Status::BadArgument));
    };
    let raw = read(&mut c, p, n)?;
    let Ok(pairs) = abi::deserialize_map(&raw) else {
        return Ok(st(Status::BadArgument));
    };
    Ok(st(set_all_headers(c.data_mut(), t, pairs)))
}

pub(super) fn proxy_get_header_map_value(
    mut c: C,
    t: i32,
    kp: i32,
    kn: i32,
    rp: i32,
    rl: i32,
) -> R<i32> {
    let Some(t) = map_type(t) else {
        return Ok(st(Status::BadArgument));
    };
    // the one value, looked up by name: not the whole map built to search it
    let found = give_filled(&mut c, rp, rl, |mem, state, out| {
        let key = abi::lossy(at(mem, kp, kn)?);
        Ok(match state.map_value(t, &abi::lower(&key)) {
            Some(v) => {
                out.extend_from_slice(&v);
                true
            }
            None => false,
        })
    })?;
    Ok(st(if found { Status::Ok } else { Status::NotFound }))
}

pub(super) fn proxy_add_header_map_value(
    mut c: C,
    t: i32,
    kp: i32,
    kn: i32,
    vp: i32,
    vn: i32,
) -> R<i32> {
    edit(&mut c, t, kp, kn, vp, vn, Mode::Add)
}

pub(super) fn proxy_replace_header_map_value(
    mut c: C,
    t: i32,
    kp: i32,
    kn: i32,
    vp: i32,
    vn: i32,
) -> R<i32> {
    edit(&mut c, t, kp, kn, vp, vn, Mode::Replace)
}

pub(super) fn proxy_remove_header_map_value(mut c: C, t: i32, kp: i32, kn: i32) -> R<i32> {
    edit(&mut c, t, kp, kn, 0, 0, Mode::Remove)
}

pub(super) fn proxy_get_property(mut c: C, p: i32, n: i32, rp: i32, rl: i32) -> R<i32> {
    let found = give_filled(&mut c, rp, rl, |mem, state, out| {
        let text = abi::lossy(at(mem, p, n)?);
        Ok(abi::with_path(&text, |path| {
            super::super::properties::get(state, path, out)
        }))
    })?;
    Ok(st(if found { Status::Ok } else { Status::NotFound }))
}

pub(super) fn proxy_set_property(mut c: C, p: i32, n: i32, vp: i32, vn: i32) -> R<i32> {
    let raw = read(&mut c, p, n)?;
    let path = abi::split_path(&String::from_utf8_lossy(&raw)).join(".");
    let v = read(&mut c, vp, vn)?;
    match c.data_mut().stream_mut() {
        Some(s) => {
            s.props.insert(path, v);
            Ok(st(Status::Ok))
        }
        None => Ok(st(Status::NotFound)),
    }
}

pub(super) fn proxy_get_shared_data(
    mut c: C,
    kp: i32,
    kn: i32,
    rp: i32,
    rl: i32,
    rcas: i32,
) -> R<i32> {
    let mut cas = 0;
    let found = give_filled(&mut c, rp, rl, |mem, state, out| {
        let key = abi::lossy(at(mem, kp, kn)?);
        Ok(
            match state.host.shared.get_into(&state.spec.vm_id, &key, out) {
                Some(c) => {
                    cas = c;
                    true
                }
                None => false,
            },
        )
    })?;
    if !found {
        return Ok(st(Status::NotFound));
    }
    write_u32(&mut c, rcas, cas)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_set_shared_data(
    mut c: C,
    kp: i32,
    kn: i32,
    vp: i32,
    vn: i32,
    cas: i32,
) -> R<i32> {
    // the key and value read in place, copied once: into the shared map
    let (mem, d) = split(&mut c)?;
    let key = abi::lossy(at(mem, kp, kn)?);
    let v = at(mem, vp, vn)?;
    Ok(
        match d.host.shared.set(&d.spec.vm_id, &key, v, cas as u32) {
            SetResult::Ok => st(Status::Ok),
            SetResult::CasMismatch => st(Status::CasMismatch),
        },
    )
}

pub(super) fn proxy_register_shared_queue(mut c: C, p: i32, n: i32, ret: i32) -> R<i32> {
    let name = read_str(&mut c, p, n)?;
    let d = c.data();
    let id = d.host.queues.register(&d.spec.vm_id, &name, &d.spec.name);
    write_u32(&mut c, ret, id)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_resolve_shared_queue(
    mut c: C,
    vp: i32,
    vn: i32,
    p: i32,
    n: i32,
    ret: i32,
) -> R<i32> {
    let vm_id = read_str(&mut c, vp, vn)?;
    let name = read_str(&mut c, p, n)?;
    let vm_id = if vm_id.is_empty() {
        c.data().spec.vm_id.clone()
    } else {
        vm_id
    };
    match c.data().host.queues.resolve(&vm_id, &name) {
        Some(id) => {
            write_u32(&mut c, ret, id)?;
            Ok(st(Status::Ok))
        }
        None => Ok(st(Status::NotFound)),
    }
}

pub(super) fn proxy_enqueue_shared_queue(mut c: C, id: i32, p: i32, n: i32) -> R<i32> {
    let v = read(&mut c, p, n)?;
    let host = c.data().host;
    match host.queues.enqueue(id as u32, &v) {
        Some(owner) => {
            host.notify_queue(&owner, id as u32);
            Ok(st(Status::Ok))
        }
        None => Ok(st(Status::NotFound)),
    }
}

pub(super) fn proxy_dequeue_shared_queue(mut c: C, id: i32, rp: i32, rl: i32) -> R<i32> {
    match c.data().host.queues.dequeue(id as u32) {
        Dequeue::Item(v) => {
            give(&mut c, &v, rp, rl)?;
            Ok(st(Status::Ok))
        }
        Dequeue::Empty => Ok(st(Status::Empty)),
        Dequeue::NotFound => Ok(st(Status::NotFound)),
    }
}

pub(super) fn proxy_continue_stream(mut c: C, t: i32) -> R<i32> {
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(st(Status::NotFound));
    };
    match t {
        abi::STREAM_REQUEST => s.continue_request = true,
        abi::STREAM_RESPONSE => s.continue_response = true,
        _ => return Ok(st(Status::BadArgument)),
    }
    Ok(st(Status::Ok))
}

pub(super) fn proxy_close_stream(mut c: C, _t: i32) -> R<i32> {
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(st(Status::NotFound));
    };
    s.reset = true;
    Ok(st(Status::Ok))
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
pub(super) fn proxy_send_local_response(
    mut c: C,
    code: i32,
    dp: i32,
    dn: i32,
    bp: i32,
    bn: i32,
    hp: i32,
    hn: i32,
    grpc: i32,
) -> R<i32> {
    let details = read_str(&mut c, dp, dn)?;
    let body = read(&mut c, bp, bn)?;
    let raw = read(&mut c, hp, hn)?;
    let Ok(headers) = abi::deserialize_map(&raw) else {
        return Ok(st(Status::BadArgument));
    };
    let status = code as u32;
    if !(200..=599).contains(&status) {
        return Ok(st(Status::BadArgument));
    }
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(st(Status::NotFound));
    };
    s.local = Some(LocalResponse {
        status: status as u16,
        details,
        headers: headers
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
            .collect(),
        body: body.into(),
        // the SDKs pass -1 for "none"
        grpc_status: u32::try_from(grpc).ok().filter(|c| *c <= 16),
    });
    Ok(st(Status::Ok))
}

#[allow(clippy::too_many_arguments)] // the ABI's signature
pub(super) fn proxy_http_call(
    mut c: C,
    up: i32,
    un: i32,
    hp: i32,
    hn: i32,
    bp: i32,
    bn: i32,
    tp: i32,
    tn: i32,
    timeout: i32,
    ret: i32,
) -> R<i32> {
    let pool = read_str(&mut c, up, un)?;
    let raw = read(&mut c, hp, hn)?;
    let body = read(&mut c, bp, bn)?;
    let _trailers = read(&mut c, tp, tn)?;
    let Some(resolved) = c.data().pools.iter().find(|p| p.name == pool).cloned() else {
        tracing::warn!(plugin = %c.data().spec.name, pool, "dispatch_http_call names no pool");
        return Ok(st(Status::BadArgument));
    };
    let Ok(pairs) = abi::deserialize_map(&raw) else {
        return Ok(st(Status::BadArgument));
    };
    let mut method = None;
    let mut path = None;
    let mut authority = None;
    let mut headers = Vec::new();
    for (k, v) in pairs {
        let k = String::from_utf8_lossy(&k).to_ascii_lowercase();
        match k.as_str() {
            ":method" => method = Some(String::from_utf8_lossy(&v).into_owned()),
            ":path" => path = Some(String::from_utf8_lossy(&v).into_owned()),
            ":authority" => authority = Some(String::from_utf8_lossy(&v).into_owned()),
            k if k.starts_with(':') => {}
            _ => headers.push((k, v)),
        }
    }
    let (Some(method), Some(path), Some(authority)) = (method, path, authority) else {
        // Envoy requires these three too.
        return Ok(st(Status::BadArgument));
    };
    let d = c.data_mut();
    let token = d.next_token;
    d.next_token = d.next_token.wrapping_add(1).max(1);
    // a request's callout goes to its own Snapshot's pool; a root context's to the live one
    let resolved = (d.effective != ROOT_ID).then_some(resolved);
    d.pending_callouts.push(Callout {
        token,
        pool,
        resolved,
        method,
        path,
        authority,
        headers,
        body,
        timeout: Duration::from_millis((timeout as u32).clamp(1, 60_000) as u64),
    });
    write_u32(&mut c, ret, token)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_define_metric(mut c: C, t: i32, p: i32, n: i32, ret: i32) -> R<i32> {
    let name = read_str(&mut c, p, n)?;
    if !(abi::METRIC_COUNTER..=abi::METRIC_HISTOGRAM).contains(&t) {
        return Ok(st(Status::BadArgument));
    }
    let plugin = c.data().spec.name.clone();
    let id = c.data().host.metrics.define(&plugin, &name, t);
    write_u32(&mut c, ret, id)?;
    Ok(st(Status::Ok))
}

pub(super) fn proxy_increment_metric(c: C, id: i32, by: i64) -> R<i32> {
    Ok(st(c.data().host.metrics.increment(id as u32, by)))
}

pub(super) fn proxy_record_metric(c: C, id: i32, v: i64) -> R<i32> {
    Ok(st(c.data().host.metrics.record(id as u32, v as u64)))
}

pub(super) fn proxy_get_metric(mut c: C, id: i32, ret: i32) -> R<i32> {
    match c.data().host.metrics.get(id as u32) {
        Some(v) => {
            write_u64(&mut c, ret, v)?;
            Ok(st(Status::Ok))
        }
        None => Ok(st(Status::NotFound)),
    }
}
