;; A proxy-wasm plugin written directly in WAT, for tests only: it drives the raw ABI where
;; the SDKs would never go. The request header `x-do` picks the behaviour:
;;   e  answer 200 with the x-do value as body (exact-length copy through our allocator)
;;   a  add `x-wat: ok` to the request sent upstream, continue
;;   p  answer 200 with the request's :path (pseudo-header read)
;;   l  spin forever (CPU deadline)
;;   t  trap (`unreachable`)
;;   o  grow memory until refused, then trap (memory cap)
;;   b  hostcall with a key pointer at the top of the address space
;;   h  hostcall with a 2 GiB length
;;   r  hostcall whose return pointer is out of range
;;   n  return 1 (pause) with nothing pending
;;   w  rewrite :path to /rewritten, continue
;;   g  in on_log: log "on_log status=" and the response's :status, then try to set
;;      :status to 599 (the request is over: the edit must be dropped)
;; Every instance counts its ticks in the metric `ticks` (20 ms period).
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  ;; an import tollgate does not know: it must link and answer InternalFailure (10)
  (import "env" "proxy_some_future_call" (func $future (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 65520))
  (data (i32.const 16) "x-do")
  (data (i32.const 32) ":path")
  (data (i32.const 48) "x-wat")
  (data (i32.const 64) "ok")
  (data (i32.const 80) "ticks")
  (data (i32.const 96) "abi_edge started\n")
  (data (i32.const 176) "/rewritten")
  (data (i32.const 240) ":status")
  (data (i32.const 256) "599")
  (data (i32.const 272) "on_log status=")
  ;; iovec for fd_write at 128: {ptr 96, len 17}
  (data (i32.const 128) "\60\00\00\00\11\00\00\00")

  (func (export "proxy_abi_version_0_2_1"))

  ;; A bump allocator that grows memory when it must: the first allocation of each request
  ;; starts at the end of page one, so the host must re-read memory after calling it.
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local $end i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (block $ok
      (loop $grow
        (br_if $ok (i32.le_u (local.get $end) (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then (return (i32.const 0))))
        (br $grow)))
    (global.set $heap (local.get $end))
    (local.get $p))

  (func (export "proxy_on_context_create") (param i32 i32))

  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $fd_write (i32.const 1) (i32.const 128) (i32.const 1) (i32.const 136)))
    (drop (call $define (i32.const 0) (i32.const 80) (i32.const 5) (i32.const 200)))
    (drop (call $tick (i32.const 20)))
    ;; unknown imports answer InternalFailure; anything else means the stub is wrong
    (if (i32.ne (call $future (i32.const 0)) (i32.const 10)) (then unreachable))
    (i32.const 1))

  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_tick") (param i32)
    (drop (call $inc (i32.load (i32.const 200)) (i64.const 1))))

  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $ptr i32) (local $len i32) (local $c i32)
    (global.set $heap (i32.const 65520))
    (if (call $get (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 0) (i32.const 4))
      (then (return (i32.const 0))))
    (local.set $ptr (i32.load (i32.const 0)))
    (local.set $len (i32.load (i32.const 4)))
    (if (i32.eqz (local.get $len)) (then (return (i32.const 0))))
    (local.set $c (i32.load8_u (local.get $ptr)))
    (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 111)) (then
      (loop $g (br_if $g (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      unreachable))
    (if (i32.eq (local.get $c) (i32.const 98)) (then
      (drop (call $get (i32.const 0) (i32.const -16) (i32.const 64) (i32.const 0) (i32.const 4)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $c) (i32.const 104)) (then
      (drop (call $log (i32.const 2) (i32.const 16) (i32.const 0x7fffffff)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $c) (i32.const 114)) (then
      (drop (call $get (i32.const 0) (i32.const 16) (i32.const 4) (i32.const -4) (i32.const 4)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $c) (i32.const 110)) (then (return (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 101)) (then
      (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
        (local.get $ptr) (local.get $len) (i32.const 0) (i32.const 0) (i32.const -1)))
      (return (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 112)) (then
      (drop (call $get (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 8) (i32.const 12)))
      (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
        (i32.load (i32.const 8)) (i32.load (i32.const 12)) (i32.const 0) (i32.const 0) (i32.const -1)))
      (return (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 119)) (then
      (drop (call $replace (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 176) (i32.const 10)))))
    (if (i32.eq (local.get $c) (i32.const 97)) (then
      (drop (call $add (i32.const 0) (i32.const 48) (i32.const 5) (i32.const 64) (i32.const 2)))))
    (i32.const 0))

  (func (export "proxy_on_log") (param i32)
    (local $ptr i32) (local $len i32)
    (if (call $get (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 0) (i32.const 4))
      (then (return)))
    (if (i32.eqz (i32.load (i32.const 4))) (then (return)))
    (if (i32.ne (i32.load8_u (i32.load (i32.const 0))) (i32.const 103)) (then (return)))
    (if (call $get (i32.const 2) (i32.const 240) (i32.const 7) (i32.const 8) (i32.const 12))
      (then (return)))
    (local.set $ptr (i32.load (i32.const 8)))
    (local.set $len (i32.load (i32.const 12)))
    (if (i32.gt_u (local.get $len) (i32.const 16)) (then (return)))
    (memory.copy (i32.const 286) (local.get $ptr) (local.get $len))
    (drop (call $log (i32.const 2) (i32.const 272) (i32.add (i32.const 14) (local.get $len))))
    (drop (call $replace (i32.const 2) (i32.const 240) (i32.const 7) (i32.const 256) (i32.const 3)))))
