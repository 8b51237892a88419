//! AWS stand-ins on loopback: moto's EC2 server (the real `moto[server]` from PyPI, which
//! keeps instances and elastic IPs and enforces `AllowReassociation`, but does not check
//! signatures), and a small instance metadata service that insists on IMDSv2 tokens.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub port: u16,
    http: reqwest::Client,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `<tag>value</tag>` of an answer.
pub fn tag(body: &str, t: &str) -> Option<String> {
    let open = format!("<{t}>");
    let s = body.find(&open)? + open.len();
    let e = body[s..].find(&format!("</{t}>"))? + s;
    Some(body[s..e].to_string())
}

impl Moto {
    pub async fn start() -> Moto {
        let port = super::free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/install-deps test installs moto[server])");
        let mut m = Moto {
            child,
            port,
            http: reqwest::Client::new(),
        };
        let end = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("moto exited with {st}: is moto[server] installed?");
            }
            assert!(Instant::now() < end, "moto did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An EC2 call. moto routes by the credential scope, so the request carries one; it does
    /// not check the signature.
    pub async fn ec2(&self, params: &[(&str, &str)]) -> String {
        let mut form: Vec<(&str, &str)> = vec![("Version", "2016-11-15")];
        form.extend_from_slice(params);
        self.http
            .post(self.endpoint())
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/ec2/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .form(&form)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn run_instances(&self, n: usize) -> Vec<String> {
        let n = n.to_string();
        let body = self
            .ec2(&[
                ("Action", "RunInstances"),
                ("ImageId", "ami-12345678"),
                ("MinCount", &n),
                ("MaxCount", &n),
            ])
            .await;
        let ids: Vec<String> = body
            .split("<instanceId>")
            .skip(1)
            .filter_map(|s| s.split("</instanceId>").next())
            .map(str::to_string)
            .collect();
        assert!(!ids.is_empty(), "RunInstances: {body}");
        ids
    }

    pub async fn allocate_address(&self) -> String {
        let body = self
            .ec2(&[("Action", "AllocateAddress"), ("Domain", "vpc")])
            .await;
        tag(&body, "allocationId").unwrap_or_else(|| panic!("AllocateAddress: {body}"))
    }

    /// Wait (up to 5 s) until the address is associated with `instance_id`.
    pub async fn wait_holder(&self, allocation_id: &str, instance_id: &str) {
        super::wait_for(
            &format!("{allocation_id} on {instance_id}"),
            Duration::from_secs(5),
            || async { self.holder(allocation_id).await.as_deref() == Some(instance_id) },
        )
        .await;
    }

    /// The instance the address is associated with.
    pub async fn holder(&self, allocation_id: &str) -> Option<String> {
        let body = self
            .ec2(&[
                ("Action", "DescribeAddresses"),
                ("AllocationId.1", allocation_id),
            ])
            .await;
        tag(&body, "instanceId").filter(|i| !i.is_empty())
    }
}

/// An instance metadata service for one instance: PUT /latest/api/token (with the TTL
/// header) gives a token; every GET must carry it, or gets 401 as IMDSv2 answers.
pub struct Imds {
    pub addr: SocketAddr,
    /// GETs refused for lack of a valid token.
    pub refused: Arc<AtomicUsize>,
    /// GETs answered.
    pub served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the metadata service knows, and what it counts.
struct ImdsState {
    token: String,
    instance_id: String,
    /// role name, access key id, secret
    role: Option<(String, String, String)>,
    refused: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl ImdsState {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, body: String| {
            Response::builder()
                .status(code)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let path = req.uri().path();
        if req.method() == hyper::Method::PUT && path == "/latest/api/token" {
            if !req
                .headers()
                .contains_key("x-aws-ec2-metadata-token-ttl-seconds")
            {
                return reply(StatusCode::BAD_REQUEST, String::new());
            }
            return reply(StatusCode::OK, self.token.clone());
        }
        let ok = req
            .headers()
            .get("x-aws-ec2-metadata-token")
            .is_some_and(|t| t.as_bytes() == self.token.as_bytes());
        if !ok {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return reply(StatusCode::UNAUTHORIZED, String::new());
        }
        self.served.fetch_add(1, Ordering::SeqCst);
        let creds = "/latest/meta-data/iam/security-credentials/";
        match (path, &self.role) {
            ("/latest/meta-data/instance-id", _) => reply(StatusCode::OK, self.instance_id.clone()),
            (p, Some((r, _, _))) if p == creds => reply(StatusCode::OK, r.clone()),
            (p, Some((r, k, s))) if p == format!("{creds}{r}") => reply(
                StatusCode::OK,
                serde_json::json!({
                    "Code": "Success",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": k,
                    "SecretAccessKey": s,
                    "Token": "imds-session-token",
                    "Expiration": "2099-01-01T00:00:00Z",
                })
                .to_string(),
            ),
            _ => reply(StatusCode::NOT_FOUND, String::new()),
        }
    }
}

impl Imds {
    /// `role`: an IAM role name and its credentials (access key id, secret).
    pub async fn start(instance_id: &str, role: Option<(&str, &str, &str)>) -> Imds {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(ImdsState {
            token: format!("imds-token-{}", std::process::id()),
            instance_id: instance_id.to_string(),
            role: role.map(|(r, k, s)| (r.to_string(), k.to_string(), s.to_string())),
            refused: refused.clone(),
            served: served.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let answer = state.answer(&req);
                        async move { Ok::<_, hyper::Error>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Imds {
            addr,
            refused,
            served,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}
