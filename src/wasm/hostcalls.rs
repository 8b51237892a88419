//! The functions a plugin imports: every proxy-wasm 0.2.0/0.2.1 hostcall the official SDKs
//! declare, and a WASI preview-1 subset (no files, network or environment; stdout and
//! stderr go to the log). Guest pointers are checked with u32 arithmetic that cannot
//! overflow; a bad pointer traps the instance (which is then discarded), it never reads or
//! writes outside the guest's memory. Nothing here calls back into the guest except its
//! allocator: callbacks a hostcall causes (a callout's answer, a queue notification) are
//! queued and delivered after the current callback returns, as Envoy does.

use super::abi::{self, BufferType, MapType, Status};
use super::shared::{Dequeue, SetResult};
use super::vm::{set_all_headers, set_header, Callout, HostState, LocalResponse, Mode, ROOT_ID};
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wasmtime::{Caller, FuncType, IntoFunc, Linker, Module, Val, ValType};

type C<'a> = Caller<'a, HostState>;
type R<T> = wasmtime::Result<T>;

fn range(ptr: i32, len: i32, size: usize) -> R<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let end = start
        .checked_add(len)
        .filter(|e| *e <= size)
        .ok_or_else(|| {
            wasmtime::format_err!(
                "hostcall given memory outside the module: {start:#x}+{len} (memory is {size} bytes)"
            )
        })?;
    Ok(start..end)
}

fn memory(c: &mut C) -> R<wasmtime::Memory> {
    c.data()
        .memory
        .ok_or_else(|| wasmtime::format_err!("module has no memory"))
}

/// Copy `len` bytes at `ptr` out of guest memory.
pub fn read(c: &mut C, ptr: i32, len: i32) -> R<Vec<u8>> {
    let m = memory(c)?;
    let data = m.data(&*c);
    let r = range(ptr, len, data.len())?;
    Ok(data[r].to_vec())
}

fn read_str(c: &mut C, ptr: i32, len: i32) -> R<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write_u32(c: &mut C, ptr: i32, v: u32) -> R<()> {
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = range(ptr, 4, data.len())?;
    data[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn write_u64(c: &mut C, ptr: i32, v: u64) -> R<()> {
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = range(ptr, 8, data.len())?;
    data[r].copy_from_slice(&v.to_le_bytes());
    Ok(())
}

/// Hand `bytes` to the guest: allocate exactly `bytes.len()` with its allocator, copy, and
/// write the pointer and length. Memory is looked up again after the allocator ran (it may
/// have grown and moved). Empty values are returned as a null pointer and length 0.
pub fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_len: i32) -> R<()> {
    if bytes.is_empty() {
        write_u32(c, ret_ptr, 0)?;
        return write_u32(c, ret_len, 0);
    }
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|l| *l < i32::MAX as u32)
        .ok_or_else(|| wasmtime::format_err!("value too large for a 32-bit guest"))?;
    let malloc = c
        .data()
        .malloc
        .clone()
        .ok_or_else(|| wasmtime::format_err!("module has no allocator"))?;
    let p = malloc.call(&mut *c, len as i32)?;
    if p == 0 {
        wasmtime::bail!("the plugin's allocator returned null for {len} bytes");
    }
    let m = memory(c)?;
    let data = m.data_mut(&mut *c);
    let r = range(p, len as i32, data.len())?;
    data[r].copy_from_slice(bytes);
    write_u32(c, ret_ptr, p as u32)?;
    write_u32(c, ret_len, len)
}

fn st(s: Status) -> i32 {
    s.code()
}

fn map_type(t: i32) -> Option<MapType> {
    MapType::from_i32(t)
}

/// Link every hostcall. Imports the module declares that tollgate does not know get a stub
/// answering InternalFailure (proxy-wasm) or ENOSYS (WASI), and are logged at load.
pub fn link(linker: &mut Linker<HostState>, module: &Module, plugin: &str) -> R<()> {
    let mut known: HashSet<(String, String)> = HashSet::new();
    proxy(linker, &mut known)?;
    for m in ["wasi_snapshot_preview1", "wasi_unstable"] {
        wasi(linker, m, &mut known)?;
    }
    for imp in module.imports() {
        let key = (imp.module().to_string(), imp.name().to_string());
        if known.contains(&key) {
            continue;
        }
        let wasmtime::ExternType::Func(ft) = imp.ty() else {
            wasmtime::bail!(
                "imports {}::{}, which is not a function; tollgate provides only functions",
                imp.module(),
                imp.name()
            );
        };
        let wasi = imp.module().starts_with("wasi");
        tracing::warn!(
            plugin,
            import = %format!("{}::{}", imp.module(), imp.name()),
            "plugin imports a function tollgate does not implement; it will answer {}",
            if wasi { "ENOSYS" } else { "InternalFailure" }
        );
        let name = format!("{}::{}", imp.module(), imp.name());
        let answer = if wasi {
            52
        } else {
            Status::InternalFailure.code()
        };
        let results: Vec<ValType> = ft.results().collect();
        let ty = FuncType::new(linker.engine(), ft.params(), results.clone());
        linker.func_new(imp.module(), imp.name(), ty, move |_c, _args, out| {
            match (out.len(), results.first()) {
                (0, _) => Ok(()),
                (1, Some(ValType::I32)) => {
                    out[0] = Val::I32(answer);
                    Ok(())
                }
                _ => wasmtime::bail!("unimplemented import {name} called"),
            }
        })?;
    }
    Ok(())
}

/// Define `module::name` with `params` (all i32 unless given) answering `answer` always.
fn constant(
    l: &mut Linker<HostState>,
    known: &mut HashSet<(String, String)>,
    module: &str,
    name: &str,
    params: &[ValType],
    answer: i32,
) -> R<()> {
    known.insert((module.to_string(), name.to_string()));
    let ty = FuncType::new(l.engine(), params.iter().cloned(), [ValType::I32]);
    l.func_new(module, name, ty, move |_c, _args, out| {
        out[0] = Val::I32(answer);
        Ok(())
    })?;
    Ok(())
}

fn i32s(n: usize) -> Vec<ValType> {
    vec![ValType::I32; n]
}

/// Link one hostcall and note it as known.
fn def<Params, Args>(
    l: &mut Linker<HostState>,
    known: &mut HashSet<(String, String)>,
    module: &str,
    name: &str,
    f: impl IntoFunc<HostState, Params, Args>,
) -> R<()> {
    known.insert((module.to_string(), name.to_string()));
    l.func_wrap(module, name, f)?;
    Ok(())
}

fn proxy(l: &mut Linker<HostState>, known: &mut HashSet<(String, String)>) -> R<()> {
    const E: &str = "env";
    def(
        l,
        known,
        E,
        "proxy_log",
        |mut c: C, level: i32, p: i32, n: i32| -> R<i32> {
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
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_get_log_level",
        |mut c: C, ret: i32| -> R<i32> {
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
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_get_current_time_nanoseconds",
        |mut c: C, ret: i32| -> R<i32> {
            let ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            write_u64(&mut c, ret, ns)?;
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_tick_period_milliseconds",
        |mut c: C, ms: i32| -> R<i32> {
            let ms = ms as u32;
            c.data_mut().tick_period = (ms > 0).then(|| Duration::from_millis(ms.max(10) as u64));
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_effective_context",
        |mut c: C, id: i32| -> R<i32> {
            let id = id as u32;
            let d = c.data_mut();
            if id == ROOT_ID || (id != 0 && id == d.stream_ctx) {
                d.effective = id;
                Ok(st(Status::Ok))
            } else {
                Ok(st(Status::BadArgument))
            }
        },
    )?;
    // Calls answered with a constant. gRPC is not supported: the SDKs return these
    // statuses to the plugin as errors, without panicking.
    let ok = Status::Ok.code();
    let (not_found, internal) = (Status::NotFound.code(), Status::InternalFailure.code());
    for (name, params, answer) in [
        ("proxy_done", 0, ok),
        ("proxy_call_foreign_function", 6, not_found),
        ("proxy_get_status", 3, not_found),
        ("proxy_grpc_call", 12, internal),
        ("proxy_grpc_stream", 9, internal),
        ("proxy_grpc_send", 4, not_found),
        ("proxy_grpc_cancel", 1, not_found),
        ("proxy_grpc_close", 1, not_found),
    ] {
        constant(l, known, E, name, &i32s(params), answer)?;
    }

    // Buffers
    def(
        l,
        known,
        E,
        "proxy_get_buffer_bytes",
        |mut c: C, t: i32, start: i32, max: i32, rp: i32, rl: i32| -> R<i32> {
            let Some(t) = BufferType::from_i32(t) else {
                return Ok(st(Status::BadArgument));
            };
            let d = c.data();
            let buf: Option<&[u8]> = match t {
                BufferType::RequestBody => d.stream().map(|s| s.req_body.as_slice()),
                BufferType::ResponseBody => d.stream().map(|s| s.resp_body.as_slice()),
                BufferType::CallResponseBody => {
                    d.callout_response.as_ref().map(|r| r.body.as_slice())
                }
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
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_buffer_bytes",
        |mut c: C, t: i32, start: i32, size: i32, p: i32, n: i32| -> R<i32> {
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
        },
    )?;

    // Header maps
    def(
        l,
        known,
        E,
        "proxy_get_header_map_pairs",
        |mut c: C, t: i32, rp: i32, rl: i32| -> R<i32> {
            let Some(t) = map_type(t) else {
                return Ok(st(Status::BadArgument));
            };
            let Some(pairs) = c.data().map_pairs(t) else {
                return Ok(st(Status::NotFound));
            };
            let bytes = abi::serialize_map(&pairs);
            give(&mut c, &bytes, rp, rl)?;
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_header_map_pairs",
        |mut c: C, t: i32, p: i32, n: i32| -> R<i32> {
            let Some(t) = map_type(t) else {
                return Ok(st(Status::BadArgument));
            };
            let raw = read(&mut c, p, n)?;
            let Ok(pairs) = abi::deserialize_map(&raw) else {
                return Ok(st(Status::BadArgument));
            };
            Ok(st(set_all_headers(c.data_mut(), t, pairs)))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_get_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32, rp: i32, rl: i32| -> R<i32> {
            let Some(t) = map_type(t) else {
                return Ok(st(Status::BadArgument));
            };
            let key = read_str(&mut c, kp, kn)?.to_ascii_lowercase();
            let Some(pairs) = c.data().map_pairs(t) else {
                return Ok(st(Status::NotFound));
            };
            match pairs.into_iter().find(|(k, _)| *k == key) {
                Some((_, v)) => {
                    give(&mut c, &v, rp, rl)?;
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;
    fn edit(c: &mut C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32, mode: Mode) -> R<i32> {
        let Some(t) = map_type(t) else {
            return Ok(st(Status::BadArgument));
        };
        let key = read_str(c, kp, kn)?;
        let value = if mode == Mode::Remove {
            Vec::new()
        } else {
            read(c, vp, vn)?
        };
        Ok(st(set_header(c.data_mut(), t, &key, &value, mode)))
    }
    def(
        l,
        known,
        E,
        "proxy_add_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| -> R<i32> {
            edit(&mut c, t, kp, kn, vp, vn, Mode::Add)
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_replace_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| -> R<i32> {
            edit(&mut c, t, kp, kn, vp, vn, Mode::Replace)
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_remove_header_map_value",
        |mut c: C, t: i32, kp: i32, kn: i32| -> R<i32> {
            edit(&mut c, t, kp, kn, 0, 0, Mode::Remove)
        },
    )?;

    // Properties
    def(
        l,
        known,
        E,
        "proxy_get_property",
        |mut c: C, p: i32, n: i32, rp: i32, rl: i32| -> R<i32> {
            let path = abi::split_path(&read(&mut c, p, n)?);
            match super::properties::get(c.data(), &path) {
                Some(v) => {
                    give(&mut c, &v, rp, rl)?;
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_property",
        |mut c: C, p: i32, n: i32, vp: i32, vn: i32| -> R<i32> {
            let path = abi::split_path(&read(&mut c, p, n)?).join(".");
            let v = read(&mut c, vp, vn)?;
            match c.data_mut().stream_mut() {
                Some(s) => {
                    s.props.insert(path, v);
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;

    // Shared data and queues (across every instance with the same vm_id)
    def(
        l,
        known,
        E,
        "proxy_get_shared_data",
        |mut c: C, kp: i32, kn: i32, rp: i32, rl: i32, rcas: i32| -> R<i32> {
            let key = read_str(&mut c, kp, kn)?;
            let got = c.data().host.shared.get(&c.data().spec.vm_id, &key);
            match got {
                Some((v, cas)) => {
                    give(&mut c, &v, rp, rl)?;
                    write_u32(&mut c, rcas, cas)?;
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_shared_data",
        |mut c: C, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| -> R<i32> {
            let key = read_str(&mut c, kp, kn)?;
            let v = read(&mut c, vp, vn)?;
            let d = c.data();
            Ok(
                match d.host.shared.set(&d.spec.vm_id, &key, &v, cas as u32) {
                    SetResult::Ok => st(Status::Ok),
                    SetResult::CasMismatch => st(Status::CasMismatch),
                },
            )
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_register_shared_queue",
        |mut c: C, p: i32, n: i32, ret: i32| -> R<i32> {
            let name = read_str(&mut c, p, n)?;
            let d = c.data();
            let id = d.host.queues.register(&d.spec.vm_id, &name, &d.spec.name);
            write_u32(&mut c, ret, id)?;
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_resolve_shared_queue",
        |mut c: C, vp: i32, vn: i32, p: i32, n: i32, ret: i32| -> R<i32> {
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
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_enqueue_shared_queue",
        |mut c: C, id: i32, p: i32, n: i32| -> R<i32> {
            let v = read(&mut c, p, n)?;
            let host = c.data().host;
            match host.queues.enqueue(id as u32, &v) {
                Some(owner) => {
                    host.notify_queue(&owner, id as u32);
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_dequeue_shared_queue",
        |mut c: C, id: i32, rp: i32, rl: i32| -> R<i32> {
            match c.data().host.queues.dequeue(id as u32) {
                Dequeue::Item(v) => {
                    give(&mut c, &v, rp, rl)?;
                    Ok(st(Status::Ok))
                }
                Dequeue::Empty => Ok(st(Status::Empty)),
                Dequeue::NotFound => Ok(st(Status::NotFound)),
            }
        },
    )?;

    // Stream control
    def(
        l,
        known,
        E,
        "proxy_continue_stream",
        |mut c: C, t: i32| -> R<i32> {
            let Some(s) = c.data_mut().stream_mut() else {
                return Ok(st(Status::NotFound));
            };
            match t {
                abi::STREAM_REQUEST => s.continue_request = true,
                abi::STREAM_RESPONSE => s.continue_response = true,
                _ => return Ok(st(Status::BadArgument)),
            }
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_close_stream",
        |mut c: C, _t: i32| -> R<i32> {
            let Some(s) = c.data_mut().stream_mut() else {
                return Ok(st(Status::NotFound));
            };
            s.reset = true;
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_send_local_response",
        |mut c: C,
         code: i32,
         dp: i32,
         dn: i32,
         bp: i32,
         bn: i32,
         hp: i32,
         hn: i32,
         _grpc: i32|
         -> R<i32> {
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
            });
            Ok(st(Status::Ok))
        },
    )?;

    // HTTP callouts: recorded here, run by the host after the callback returns.
    def(
        l,
        known,
        E,
        "proxy_http_call",
        |mut c: C,
         up: i32,
         un: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         tp: i32,
         tn: i32,
         timeout: i32,
         ret: i32|
         -> R<i32> {
            let pool = read_str(&mut c, up, un)?;
            let raw = read(&mut c, hp, hn)?;
            let body = read(&mut c, bp, bn)?;
            let _trailers = read(&mut c, tp, tn)?;
            if !c.data().pools.contains(&pool) {
                tracing::warn!(plugin = %c.data().spec.name, pool, "dispatch_http_call names no pool");
                return Ok(st(Status::BadArgument));
            }
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
            d.pending_callouts.push(Callout {
                token,
                pool,
                method,
                path,
                authority,
                headers,
                body,
                timeout: Duration::from_millis((timeout as u32).clamp(1, 60_000) as u64),
            });
            write_u32(&mut c, ret, token)?;
            Ok(st(Status::Ok))
        },
    )?;
    // Metrics
    def(
        l,
        known,
        E,
        "proxy_define_metric",
        |mut c: C, t: i32, p: i32, n: i32, ret: i32| -> R<i32> {
            let name = read_str(&mut c, p, n)?;
            if !(abi::METRIC_COUNTER..=abi::METRIC_HISTOGRAM).contains(&t) {
                return Ok(st(Status::BadArgument));
            }
            let plugin = c.data().spec.name.clone();
            let id = c.data().host.metrics.define(&plugin, &name, t);
            write_u32(&mut c, ret, id)?;
            Ok(st(Status::Ok))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_increment_metric",
        |c: C, id: i32, by: i64| -> R<i32> {
            Ok(st(c.data().host.metrics.increment(id as u32, by)))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_record_metric",
        |c: C, id: i32, v: i64| -> R<i32> {
            Ok(st(c.data().host.metrics.record(id as u32, v as u64)))
        },
    )?;
    def(
        l,
        known,
        E,
        "proxy_get_metric",
        |mut c: C, id: i32, ret: i32| -> R<i32> {
            match c.data().host.metrics.get(id as u32) {
                Some(v) => {
                    write_u64(&mut c, ret, v)?;
                    Ok(st(Status::Ok))
                }
                None => Ok(st(Status::NotFound)),
            }
        },
    )?;
    Ok(())
}

// WASI preview 1 errno values
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;

fn wasi(
    l: &mut Linker<HostState>,
    m: &'static str,
    known: &mut HashSet<(String, String)>,
) -> R<()> {
    def(
        l,
        known,
        m,
        "fd_write",
        |mut c: C, fd: i32, iovs: i32, n: i32, ret: i32| -> R<i32> {
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            let iov = read(
                &mut c,
                iovs,
                (n as u32).saturating_mul(8).min(1 << 20) as i32,
            )?;
            let mut total = 0u32;
            for chunk in iov.chunks_exact(8) {
                let p = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                let len = i32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
                let bytes = read(&mut c, p, len)?;
                total = total.saturating_add(bytes.len() as u32);
                let d = c.data_mut();
                d.stdout.extend_from_slice(&bytes);
                while let Some(nl) = d.stdout.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = d.stdout.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    tracing::info!(plugin = %d.spec.name, fd, "{line}");
                }
                if d.stdout.len() > 4096 {
                    let line = String::from_utf8_lossy(&d.stdout).into_owned();
                    d.stdout.clear();
                    tracing::info!(plugin = %d.spec.name, fd, "{line}");
                }
            }
            write_u32(&mut c, ret, total)?;
            Ok(ESUCCESS)
        },
    )?;
    // No files, no environment, no arguments, no polling.
    let (i, l64) = (ValType::I32, ValType::I64);
    for (name, params, answer) in [
        ("fd_read", vec![i.clone(); 4], EBADF),
        ("fd_close", vec![i.clone()], EBADF),
        ("fd_seek", vec![i.clone(), l64, i.clone(), i.clone()], EBADF),
        ("fd_fdstat_get", vec![i.clone(); 2], EBADF),
        ("fd_prestat_get", vec![i.clone(); 2], EBADF),
        ("fd_prestat_dir_name", vec![i.clone(); 3], EBADF),
        ("environ_get", vec![i.clone(); 2], ESUCCESS),
        ("args_get", vec![i.clone(); 2], ESUCCESS),
        ("sched_yield", vec![], ESUCCESS),
        ("poll_oneoff", vec![i.clone(); 4], ENOSYS),
    ] {
        constant(l, known, m, name, &params, answer)?;
    }
    for name in ["environ_sizes_get", "args_sizes_get"] {
        known.insert((m.to_string(), name.to_string()));
        l.func_wrap(m, name, |mut c: C, count: i32, size: i32| -> R<i32> {
            write_u32(&mut c, count, 0)?;
            write_u32(&mut c, size, 0)?;
            Ok(ESUCCESS)
        })?;
    }
    def(
        l,
        known,
        m,
        "clock_time_get",
        |mut c: C, id: i32, _prec: i64, ret: i32| -> R<i32> {
            let ns = match id {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                1..=3 => crate::upstream::now_ms().saturating_mul(1_000_000).max(1),
                _ => return Ok(EINVAL),
            };
            write_u64(&mut c, ret, ns)?;
            Ok(ESUCCESS)
        },
    )?;
    def(
        l,
        known,
        m,
        "clock_res_get",
        |mut c: C, _id: i32, ret: i32| -> R<i32> {
            write_u64(&mut c, ret, 1_000)?;
            Ok(ESUCCESS)
        },
    )?;
    def(
        l,
        known,
        m,
        "random_get",
        |mut c: C, p: i32, n: i32| -> R<i32> {
            use ring::rand::SecureRandom;
            let m = memory(&mut c)?;
            let data = m.data_mut(&mut c);
            let r = range(p, n, data.len())?;
            ring::rand::SystemRandom::new()
                .fill(&mut data[r])
                .map_err(|_| wasmtime::format_err!("no system randomness"))?;
            Ok(ESUCCESS)
        },
    )?;
    def(l, known, m, "proc_exit", |c: C, code: i32| -> R<()> {
        wasmtime::bail!("plugin {} called proc_exit({code})", c.data().spec.name)
    })?;
    Ok(())
}
