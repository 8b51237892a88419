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

mod env;
mod wasi;
#[allow(clippy::wildcard_imports)]
use {env::*, wasi::*};

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

/// The guest's memory and the host state at once: a hostcall reads its arguments where
/// they are (no copy) while it acts on the state.
fn split<'a>(c: &'a mut C) -> R<(&'a mut [u8], &'a mut HostState)> {
    let m = memory(c)?;
    Ok(m.data_and_store_mut(c))
}

/// `len` bytes at `ptr` of guest memory `mem`, checked.
fn at(mem: &[u8], ptr: i32, len: i32) -> R<&[u8]> {
    Ok(&mem[range(ptr, len, mem.len())?])
}

/// Hand the guest the value `fill` writes into the instance's scratch buffer (`fill` gets
/// guest memory, to read its arguments in place, and the state; false: there is no value,
/// and nothing is handed over). The buffer is kept for the next call.
fn give_filled(
    c: &mut C,
    ret_ptr: i32,
    ret_len: i32,
    fill: impl FnOnce(&[u8], &HostState, &mut Vec<u8>) -> R<bool>,
) -> R<bool> {
    /// A larger buffer is let go after the call rather than kept.
    const KEEP: usize = 64 << 10;
    let mut buf = std::mem::take(&mut c.data_mut().scratch);
    buf.clear();
    let found = {
        let (mem, state) = split(c)?;
        fill(mem, state, &mut buf)
    };
    let r = match found {
        Ok(true) => give(c, &buf, ret_ptr, ret_len).map(|()| true),
        other => other,
    };
    if buf.capacity() <= KEEP {
        c.data_mut().scratch = buf;
    }
    r
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

/// The proxy-wasm hostcalls (`env`): the registration table.
fn proxy(l: &mut Linker<HostState>, known: &mut HashSet<(String, String)>) -> R<()> {
    const E: &str = "env";
    def(l, known, E, "proxy_log", proxy_log)?;
    def(l, known, E, "proxy_get_log_level", proxy_get_log_level)?;
    def(
        l,
        known,
        E,
        "proxy_get_current_time_nanoseconds",
        proxy_get_current_time_nanoseconds,
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_tick_period_milliseconds",
        proxy_set_tick_period_milliseconds,
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_effective_context",
        proxy_set_effective_context,
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
        proxy_get_buffer_bytes,
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_buffer_bytes",
        proxy_set_buffer_bytes,
    )?;

    // Header maps
    def(
        l,
        known,
        E,
        "proxy_get_header_map_pairs",
        proxy_get_header_map_pairs,
    )?;
    def(
        l,
        known,
        E,
        "proxy_set_header_map_pairs",
        proxy_set_header_map_pairs,
    )?;
    def(
        l,
        known,
        E,
        "proxy_get_header_map_value",
        proxy_get_header_map_value,
    )?;
    def(
        l,
        known,
        E,
        "proxy_add_header_map_value",
        proxy_add_header_map_value,
    )?;
    def(
        l,
        known,
        E,
        "proxy_replace_header_map_value",
        proxy_replace_header_map_value,
    )?;
    def(
        l,
        known,
        E,
        "proxy_remove_header_map_value",
        proxy_remove_header_map_value,
    )?;

    // Properties
    def(l, known, E, "proxy_get_property", proxy_get_property)?;
    def(l, known, E, "proxy_set_property", proxy_set_property)?;

    // Shared data and queues (across every instance with the same vm_id)
    def(l, known, E, "proxy_get_shared_data", proxy_get_shared_data)?;
    def(l, known, E, "proxy_set_shared_data", proxy_set_shared_data)?;
    def(
        l,
        known,
        E,
        "proxy_register_shared_queue",
        proxy_register_shared_queue,
    )?;
    def(
        l,
        known,
        E,
        "proxy_resolve_shared_queue",
        proxy_resolve_shared_queue,
    )?;
    def(
        l,
        known,
        E,
        "proxy_enqueue_shared_queue",
        proxy_enqueue_shared_queue,
    )?;
    def(
        l,
        known,
        E,
        "proxy_dequeue_shared_queue",
        proxy_dequeue_shared_queue,
    )?;

    // Stream control
    def(l, known, E, "proxy_continue_stream", proxy_continue_stream)?;
    def(l, known, E, "proxy_close_stream", proxy_close_stream)?;
    def(
        l,
        known,
        E,
        "proxy_send_local_response",
        proxy_send_local_response,
    )?;

    // HTTP callouts: recorded here, run by the host after the callback returns.
    def(l, known, E, "proxy_http_call", proxy_http_call)?;
    // Metrics
    def(l, known, E, "proxy_define_metric", proxy_define_metric)?;
    def(
        l,
        known,
        E,
        "proxy_increment_metric",
        proxy_increment_metric,
    )?;
    def(l, known, E, "proxy_record_metric", proxy_record_metric)?;
    def(l, known, E, "proxy_get_metric", proxy_get_metric)?;
    Ok(())
}

// WASI preview 1 errno values
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;

/// The WASI functions, in module `m`: those tollgate implements and the refused rest.
fn wasi(
    l: &mut Linker<HostState>,
    m: &'static str,
    known: &mut HashSet<(String, String)>,
) -> R<()> {
    def(l, known, m, "fd_write", fd_write)?;
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
    def(l, known, m, "clock_time_get", clock_time_get)?;
    def(l, known, m, "clock_res_get", clock_res_get)?;
    def(l, known, m, "random_get", random_get)?;
    def(l, known, m, "proc_exit", proc_exit)?;
    Ok(())
}
