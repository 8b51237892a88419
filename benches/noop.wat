;; A proxy-wasm module that does nothing: only proxy_on_request_headers (Continue).
;; The host's own cost per plugin; benches/wasm_call.rs and benches/plugins.py load it.
(module
  (memory (export "memory") 1)
  (global $h (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    (local $p i32) (local.set $p (global.get $h))
    (global.set $h (i32.add (global.get $h) (local.get 0))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))
