//! Hostcall unit tests: a WAT module re-exports the hostcalls it imports, so each test calls
//! one hostcall with exactly the pointers and lengths it wants and reads guest memory back.

use super::vm::{RequestInfo, StreamData, Vm};
use super::{hostcalls, Host};
use crate::config::{OnError, Origin, PluginSpec};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{Linker, Module, Val};

/// One plugin host for these tests (each host holds threads for the life of the process).
fn test_host() -> &'static Host {
    static H: std::sync::OnceLock<&'static Host> = std::sync::OnceLock::new();
    H.get_or_init(Host::new)
}

const WAT: &str = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $setpairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $setprop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $sget (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $qreg (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $qenq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $qdeq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $getbuf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $setbuf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_not_in_any_sdk" (func $unknown (param i32 i64) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $envsz (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (export "log" (func $log))
  (export "pairs" (func $pairs))
  (export "value" (func $value))
  (export "replace" (func $replace))
  (export "remove" (func $remove))
  (export "setpairs" (func $setpairs))
  (export "prop" (func $prop))
  (export "setprop" (func $setprop))
  (export "sset" (func $sset))
  (export "sget" (func $sget))
  (export "qreg" (func $qreg))
  (export "qenq" (func $qenq))
  (export "qdeq" (func $qdeq))
  (export "local" (func $local))
  (export "getbuf" (func $getbuf))
  (export "setbuf" (func $setbuf))
  (export "call" (func $call))
  (export "eff" (func $eff))
  (export "grpc" (func $grpc))
  (export "unknown" (func $unknown))
  (export "envsz" (func $envsz))
  (export "open" (func $open))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 32768))
  (global $last (mut i32) (i32.const -1))
  (global $count (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (global.set $last (local.get $n))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "last_alloc") (result i32) (global.get $last))
  (func (export "alloc_count") (result i32) (global.get $count))
  (func (export "proxy_on_context_create") (param i32 i32)))"#;

const CTX: u32 = 7;
// Scratch addresses in guest memory for arguments and results.
const ARG: usize = 1024;
const ARG2: usize = 2048;
const RP: usize = 16;
const RL: usize = 20;
const RX: usize = 24;

struct T {
    vm: Vm,
}

/// A plugin's settings for these tests: 1 s deadline, 1 MiB memory, fail_closed.
fn spec(name: &str, vm_id: &str, config: &[u8]) -> Arc<PluginSpec> {
    Arc::new(PluginSpec {
        name: name.into(),
        file: format!("{name}.wat").into(),
        config: config.to_vec(),
        vm_config: Vec::new(),
        vm_id: vm_id.into(),
        root_id: String::new(),
        on_error: OnError::FailClosed,
        cpu_deadline: Duration::from_secs(1),
        max_memory: 1 << 20,
        origin: Origin {
            file: Arc::from("t"),
            line: 1,
        },
    })
}

impl T {
    /// Pools of these names (one backend each, never reached), as a request's Snapshot has.
    fn callout_pools(names: &[&str]) -> super::CalloutPools {
        let mut text = String::from("[[listener]]\naddress = \"127.0.0.1:1\"\n");
        for n in names {
            text.push_str(&format!("[pool.{n}]\nbackends = [\"127.0.0.1:9\"]\n"));
        }
        let cfg = crate::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let registry = crate::upstream::Registry::default();
        let metrics = crate::metrics::Metrics::default();
        Arc::new(
            names
                .iter()
                .map(|n| Arc::new(registry.pool(n, &cfg.pools[*n], &metrics)))
                .collect(),
        )
    }

    /// An instance with a request loaded (context CTX), vm_id unique to the test.
    fn new(vm_id: &str) -> T {
        let spec = spec("t", vm_id, br#"{"plugin":"config"}"#);
        let module = Module::new(test_host().engine(), WAT).unwrap();
        let mut linker = Linker::new(test_host().engine());
        hostcalls::link(&mut linker, &module, "t").unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        let mut vm = Vm::start(test_host(), spec, &pre).unwrap();
        let mut req = pingora::http::RequestHeader::build("GET", b"/a/b?x=1", None).unwrap();
        req.insert_header("host", "example.test").unwrap();
        req.insert_header("x-one", "1").unwrap();
        req.insert_header("x-bytes", &b"caf\xe9"[..]).unwrap();
        let info = RequestInfo {
            source: Some("192.0.2.9:40443".parse().unwrap()),
            request_id: "rid".into(),
            route: Arc::new(super::vm::RouteNames {
                route_name: "example.test/a".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut data = Some(Box::new(StreamData::new(info, req)));
        vm.load(CTX, &mut data, &Self::callout_pools(&["auth-pool"]));
        T { vm }
    }

    fn call(&mut self, name: &str, args: &[i64]) -> Result<i32, String> {
        let f = self.vm.instance.get_func(&mut self.vm.store, name).unwrap();
        let ty = f.ty(&self.vm.store);
        let vals: Vec<Val> = args
            .iter()
            .zip(ty.params())
            .map(|(a, t)| match t {
                wasmtime::ValType::I64 => Val::I64(*a),
                _ => Val::I32(*a as i32),
            })
            .collect();
        let mut out = [Val::I32(0)];
        f.call(&mut self.vm.store, &vals, &mut out)
            .map_err(|e| format!("{e:#}"))?;
        Ok(out[0].unwrap_i32())
    }

    fn ok(&mut self, name: &str, args: &[i64]) -> i32 {
        self.call(name, args).unwrap()
    }

    fn poke(&mut self, at: usize, bytes: &[u8]) -> (i64, i64) {
        let m = self.vm.store.data().memory.unwrap();
        m.write(&mut self.vm.store, at, bytes).unwrap();
        (at as i64, bytes.len() as i64)
    }

    fn peek(&mut self, at: usize, len: usize) -> Vec<u8> {
        let m = self.vm.store.data().memory.unwrap();
        let mut out = vec![0; len];
        m.read(&self.vm.store, at, &mut out).unwrap();
        out
    }

    fn u32_at(&mut self, at: usize) -> u32 {
        u32::from_le_bytes(self.peek(at, 4).try_into().unwrap())
    }

    /// The bytes a hostcall handed back through (RP, RL).
    fn returned(&mut self) -> Vec<u8> {
        let (p, l) = (self.u32_at(RP) as usize, self.u32_at(RL) as usize);
        self.peek(p, l)
    }

    fn stream(&mut self) -> &mut StreamData {
        self.vm.store.data_mut().stream.as_deref_mut().unwrap()
    }
}

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const EMPTY: i32 = 7;
const CAS_MISMATCH: i32 = 8;
const INTERNAL_FAILURE: i32 = 10;

#[test]
fn header_pairs_are_serialized_and_allocated_at_exactly_their_length() {
    let mut t = T::new("pairs");
    assert_eq!(t.ok("pairs", &[0, RP as i64, RL as i64]), OK);
    let bytes = t.returned();
    assert_eq!(t.ok("last_alloc", &[]) as usize, bytes.len());
    let pairs = super::abi::deserialize_map(&bytes).unwrap();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k.as_bytes())
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get(":method").unwrap(), b"GET");
    assert_eq!(get(":path").unwrap(), b"/a/b?x=1");
    assert_eq!(get(":authority").unwrap(), b"example.test");
    assert_eq!(get(":scheme").unwrap(), b"http");
    assert_eq!(get("x-one").unwrap(), b"1");
    // not UTF-8 from the client: replaced, so the SDKs' string getters cannot panic
    assert_eq!(get("x-bytes").unwrap(), "caf\u{fffd}".as_bytes());
}

#[test]
fn header_values_get_replace_remove_and_pseudo_headers_write_back() {
    let mut t = T::new("values");
    let (k, kl) = t.poke(ARG, b"X-One");
    assert_eq!(t.ok("value", &[0, k, kl, RP as i64, RL as i64]), OK);
    assert_eq!(t.returned(), b"1", "names are matched lower-case");
    let (k, kl) = t.poke(ARG, b"x-missing");
    assert_eq!(t.ok("value", &[0, k, kl, RP as i64, RL as i64]), NOT_FOUND);
    let (k, kl) = t.poke(ARG, b":path");
    let (v, vl) = t.poke(ARG2, b"/rewritten?y=2");
    assert_eq!(t.ok("replace", &[0, k, kl, v, vl]), OK);
    let (k, kl) = t.poke(ARG, b":method");
    let (v, vl) = t.poke(ARG2, b"POST");
    assert_eq!(t.ok("replace", &[0, k, kl, v, vl]), OK);
    let (k, kl) = t.poke(ARG, b"x-one");
    assert_eq!(t.ok("remove", &[0, k, kl]), OK);
    let (k, kl) = t.poke(ARG, b"x-new");
    let (v, vl) = t.poke(ARG2, b"bad\nvalue");
    assert_eq!(t.ok("replace", &[0, k, kl, v, vl]), BAD_ARGUMENT);
    let s = t.stream();
    assert_eq!(s.req.uri.to_string(), "/rewritten?y=2");
    assert_eq!(s.req.method, http::Method::POST);
    assert!(s.req.headers.get("x-one").is_none());
    // the response map does not exist before the response
    assert_eq!(t.ok("pairs", &[2, RP as i64, RL as i64]), NOT_FOUND);
    // an unknown map type
    assert_eq!(t.ok("pairs", &[99, RP as i64, RL as i64]), BAD_ARGUMENT);
}

#[test]
fn a_hostile_map_is_a_bad_argument_not_a_crash() {
    let mut t = T::new("hostile");
    // count 0xffffffff in an 8-byte map
    let (p, l) = t.poke(ARG, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    assert_eq!(t.ok("setpairs", &[0, p, l]), BAD_ARGUMENT);
    let pairs = super::abi::serialize_map(&[("x-a", "1"), (":path", "/new")]);
    let (p, l) = t.poke(ARG, &pairs);
    assert_eq!(t.ok("setpairs", &[0, p, l]), OK);
    let s = t.stream();
    assert_eq!(s.req.headers.len(), 1, "the map replaced every header");
    assert_eq!(s.req.uri.path(), "/new");
}

#[test]
fn bad_pointers_and_lengths_trap_instead_of_touching_host_memory() {
    let mut t = T::new("pointers");
    // past the end of memory
    let e = t.call("log", &[2, 65_530, 64]).unwrap_err();
    assert!(e.contains("outside the module"), "{e}");
    // u32 arithmetic that would wrap: 0xffffffff + 2
    let e = t.call("log", &[2, -1, 2]).unwrap_err();
    assert!(e.contains("outside the module"), "{e}");
    // a 2 GiB length
    let e = t.call("log", &[2, 0, 0x7fff_ffff]).unwrap_err();
    assert!(e.contains("outside the module"), "{e}");
    // a return pointer out of range, after the value was allocated
    let (k, kl) = t.poke(ARG, b"x-one");
    let e = t.call("value", &[0, k, kl, -4, RL as i64]).unwrap_err();
    assert!(e.contains("outside the module"), "{e}");
}

#[test]
fn properties_use_envoy_paths_and_encodings() {
    let mut t = T::new("props");
    let get = |t: &mut T, path: &[u8]| {
        let (p, l) = t.poke(ARG, path);
        match t.ok("prop", &[p, l, RP as i64, RL as i64]) {
            OK => Some(t.returned()),
            NOT_FOUND => None,
            s => panic!("status {s}"),
        }
    };
    assert_eq!(
        get(&mut t, b"source\0port").unwrap(),
        40443i64.to_le_bytes()
    );
    assert_eq!(get(&mut t, b"source\0address").unwrap(), b"192.0.2.9:40443");
    assert_eq!(get(&mut t, b"request\0path").unwrap(), b"/a/b?x=1");
    assert_eq!(get(&mut t, b"request\0url_path").unwrap(), b"/a/b");
    assert_eq!(get(&mut t, b"plugin_name\0").unwrap(), b"t");
    assert_eq!(get(&mut t, b"route_name").unwrap(), b"example.test/a");
    let headers = get(&mut t, b"request\0headers").unwrap();
    assert!(super::abi::deserialize_map(&headers).is_ok());
    assert_eq!(get(&mut t, b"no\0such\0thing"), None);
    // set, then read back by the same path
    let (p, l) = t.poke(ARG, b"filter\0state");
    let (v, vl) = t.poke(ARG2, b"value");
    assert_eq!(t.ok("setprop", &[p, l, v, vl]), OK);
    assert_eq!(get(&mut t, b"filter\0state").unwrap(), b"value");
}

#[test]
fn shared_data_compare_and_swap() {
    let mut t = T::new("cas-test");
    let (k, kl) = t.poke(ARG, b"counter");
    let (v, vl) = t.poke(ARG2, b"1");
    assert_eq!(
        t.ok("sget", &[k, kl, RP as i64, RL as i64, RX as i64]),
        NOT_FOUND
    );
    assert_eq!(t.ok("sset", &[k, kl, v, vl, 0]), OK);
    assert_eq!(t.ok("sget", &[k, kl, RP as i64, RL as i64, RX as i64]), OK);
    assert_eq!(t.returned(), b"1");
    let cas = t.u32_at(RX) as i64;
    assert_ne!(cas, 0);
    let (v, vl) = t.poke(ARG2, b"2");
    assert_eq!(t.ok("sset", &[k, kl, v, vl, cas + 1]), CAS_MISMATCH);
    assert_eq!(t.ok("sset", &[k, kl, v, vl, cas]), OK);
    assert_eq!(
        t.ok("sset", &[k, kl, v, vl, cas]),
        CAS_MISMATCH,
        "the cas moved on"
    );
}

#[test]
fn shared_queues_register_enqueue_dequeue() {
    let mut t = T::new("queue-test");
    let (n, nl) = t.poke(ARG, b"jobs");
    assert_eq!(t.ok("qreg", &[n, nl, RX as i64]), OK);
    let id = t.u32_at(RX) as i64;
    assert_eq!(t.ok("qdeq", &[id, RP as i64, RL as i64]), EMPTY);
    let (v, vl) = t.poke(ARG2, b"job-1");
    assert_eq!(t.ok("qenq", &[id, v, vl]), OK);
    assert_eq!(t.ok("qdeq", &[id, RP as i64, RL as i64]), OK);
    assert_eq!(t.returned(), b"job-1");
    assert_eq!(t.ok("qdeq", &[id + 1000, RP as i64, RL as i64]), NOT_FOUND);
    assert_eq!(t.ok("qenq", &[id + 1000, v, vl]), NOT_FOUND);
}

#[test]
fn local_response_buffers_and_configuration() {
    let mut t = T::new("local");
    let (b, bl) = t.poke(ARG, b"denied");
    let hdrs = super::abi::serialize_map(&[("X-Reason", "test")]);
    let (h, hl) = t.poke(ARG2, &hdrs);
    assert_eq!(t.ok("local", &[99, 0, 0, b, bl, h, hl, -1]), BAD_ARGUMENT);
    assert_eq!(t.ok("local", &[403, 0, 0, b, bl, h, hl, -1]), OK);
    let local = t.stream().local.clone().unwrap();
    assert_eq!(local.status, 403);
    assert_eq!(&local.body[..], b"denied");
    assert_eq!(
        local.headers,
        vec![("x-reason".to_string(), b"test".to_vec())]
    );
    // the plugin configuration, sliced by start and max
    assert_eq!(t.ok("getbuf", &[7, 2, 6, RP as i64, RL as i64]), OK);
    assert_eq!(t.returned(), b"plugin");
    // body splicing: replace [2, 4) of "abcdef" with "XYZ"; then append past the end
    t.stream().req_body = b"abcdef".to_vec();
    let (v, vl) = t.poke(ARG, b"XYZ");
    assert_eq!(t.ok("setbuf", &[0, 2, 2, v, vl]), OK);
    assert_eq!(t.stream().req_body, b"abXYZef");
    assert_eq!(t.ok("setbuf", &[0, 100, 0, v, vl]), OK);
    assert_eq!(t.stream().req_body, b"abXYZefXYZ");
    assert_eq!(t.ok("getbuf", &[0, 0, 1000, RP as i64, RL as i64]), OK);
    assert_eq!(t.returned(), b"abXYZefXYZ");
    // a buffer that does not exist here
    assert_eq!(t.ok("getbuf", &[5, 0, 10, RP as i64, RL as i64]), NOT_FOUND);
}

#[test]
fn http_calls_need_a_known_pool_and_the_three_pseudo_headers() {
    let mut t = T::new("callouts");
    let full = super::abi::serialize_map(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "auth"),
        ("X-Token", "t"),
    ]);
    let no_path = super::abi::serialize_map(&[(":method", "GET"), (":authority", "auth")]);
    let (u, ul) = t.poke(ARG, b"auth-pool");
    let (h, hl) = t.poke(ARG2, &full);
    assert_eq!(
        t.ok("call", &[u, ul, h, hl, 0, 0, 0, 0, 500, RX as i64]),
        OK
    );
    let token = t.u32_at(RX);
    let (h2, hl2) = t.poke(ARG2 + 512, &no_path);
    assert_eq!(
        t.ok("call", &[u, ul, h2, hl2, 0, 0, 0, 0, 500, RX as i64]),
        BAD_ARGUMENT
    );
    let (u2, ul2) = t.poke(ARG + 256, b"nowhere");
    assert_eq!(
        t.ok("call", &[u2, ul2, h, hl, 0, 0, 0, 0, 500, RX as i64]),
        BAD_ARGUMENT
    );
    let pending = t.vm.take_callouts();
    assert_eq!(pending.len(), 1);
    let c = &pending[0];
    assert_eq!(
        (c.token, c.method.as_str(), c.path.as_str()),
        (token, "GET", "/check")
    );
    assert_eq!(c.headers, vec![("x-token".to_string(), b"t".to_vec())]);
    assert_eq!(c.timeout, Duration::from_millis(500));
}

#[test]
fn contexts_unsupported_calls_and_unknown_imports_answer_statuses() {
    let mut t = T::new("misc");
    assert_eq!(t.ok("eff", &[1]), OK, "the root context");
    assert_eq!(t.ok("eff", &[CTX as i64]), OK, "the loaded HTTP context");
    assert_eq!(t.ok("eff", &[12345]), BAD_ARGUMENT);
    assert_eq!(t.ok("grpc", &[0; 12]), INTERNAL_FAILURE);
    assert_eq!(t.ok("unknown", &[0, 0]), INTERNAL_FAILURE);
    // WASI: no environment, no files
    assert_eq!(t.ok("envsz", &[RP as i64, RL as i64]), 0);
    assert_eq!((t.u32_at(RP), t.u32_at(RL)), (0, 0));
    assert_eq!(
        t.ok("open", &[3, 0, 0, 0, 0, 0, 0, 0, RX as i64]),
        52,
        "ENOSYS"
    );
    // with no HTTP context in effect, stream calls find nothing
    assert_eq!(t.ok("eff", &[1]), OK);
    let (k, kl) = t.poke(ARG, b"x-one");
    assert_eq!(t.ok("value", &[0, k, kl, RP as i64, RL as i64]), NOT_FOUND);
}

#[test]
fn a_module_without_wasi_and_with_a_malloc_allocator_starts() {
    // what wasm32-unknown-unknown builds look like: no imports at all, `malloc`
    let wat = r#"(module
      (memory (export "memory") 1)
      (global $h (mut i32) (i32.const 1024))
      (func (export "proxy_abi_version_0_2_0"))
      (func (export "malloc") (param i32) (result i32)
        (local $p i32) (local.set $p (global.get $h))
        (global.set $h (i32.add (global.get $h) (local.get 0))) (local.get $p))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#;
    let module = Module::new(test_host().engine(), wat).unwrap();
    assert_eq!(module.imports().count(), 0);
    let mut linker = Linker::new(test_host().engine());
    hostcalls::link(&mut linker, &module, "plain").unwrap();
    let pre = linker.instantiate_pre(&module).unwrap();
    let mut vm = Vm::start(test_host(), spec("plain", "plain", b""), &pre).unwrap();
    let ctx = vm.new_context().unwrap();
    let r = vm.call_export(|e| e.on_request_headers.as_ref(), (ctx as i32, 0, 1));
    assert_eq!(r.unwrap(), Some(0));
}

#[test]
fn a_recycled_chain_keeps_nothing_of_its_last_request() {
    use super::{Chain, LocalResponse, Plugin};
    let pools: super::CalloutPools = Arc::new(Vec::new());
    let none: Arc<[Arc<Plugin>]> = Arc::from(Vec::new());
    let mut c = Chain::lent(&none, &pools);
    assert_eq!(Arc::strong_count(&pools), 2, "the chain holds the pools");
    let d = c.data_mut();
    d.info.request_id.push_str("first-request");
    d.info.sni.push_str("first.example");
    d.props.insert("filter.user".into(), b"alice".to_vec());
    d.req_body.extend_from_slice(b"secret body");
    d.resp_body.extend(vec![7u8; 100 << 10]);
    d.reset = true;
    d.continue_request = true;
    d.local = Some(LocalResponse {
        status: 403,
        details: String::new(),
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"no"),
        grpc_status: None,
    });
    let first: *const Chain = &*c;
    c.recycle();
    assert_eq!(Arc::strong_count(&pools), 1, "a spare lets the pools go");

    let c = Chain::lent(&none, &pools);
    assert_eq!(&*c as *const Chain, first, "this thread's spare is reused");
    let d = c.data();
    assert!(d.info.request_id.is_empty() && d.info.sni.is_empty());
    assert!(d.props.is_empty() && d.req_body.is_empty() && d.resp_body.is_empty());
    assert_eq!(d.resp_body.capacity(), 0, "a large buffer is not kept");
    assert!(d.local.is_none() && d.resp.is_none());
    assert!(!d.reset && !d.continue_request && !d.continue_response);
    assert_eq!(
        d.req.uri.path(),
        "/",
        "between phases the header is the placeholder"
    );
    c.recycle();
}
