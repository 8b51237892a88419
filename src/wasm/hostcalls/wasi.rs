//! The WASI preview-1 functions tollgate implements (stdout and stderr to the log, clocks,
//! randomness, exit); `super::wasi` is their registration table with the refused rest.

use super::*;

pub(super) fn fd_write(mut c: C, fd: i32, iovs: i32, n: i32, ret: i32) -> R<i32> {
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
}

pub(super) fn clock_time_get(mut c: C, id: i32, _prec: i64, ret: i32) -> R<i32> {
    let ns = match id {
        0 => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        1..=3 => crate::clock::now_ms().saturating_mul(1_000_000).max(1),
        _ => return Ok(EINVAL),
    };
    write_u64(&mut c, ret, ns)?;
    Ok(ESUCCESS)
}

pub(super) fn clock_res_get(mut c: C, _id: i32, ret: i32) -> R<i32> {
    write_u64(&mut c, ret, 1_000)?;
    Ok(ESUCCESS)
}

pub(super) fn random_get(mut c: C, p: i32, n: i32) -> R<i32> {
    use ring::rand::SecureRandom;
    let m = memory(&mut c)?;
    let data = m.data_mut(&mut c);
    let r = range(p, n, data.len())?;
    ring::rand::SystemRandom::new()
        .fill(&mut data[r])
        .map_err(|_| wasmtime::format_err!("no system randomness"))?;
    Ok(ESUCCESS)
}

pub(super) fn proc_exit(c: C, code: i32) -> R<()> {
    wasmtime::bail!("plugin {} called proc_exit({code})", c.data().spec.name)
}
