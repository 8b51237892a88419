//! The `aws_eip` claim: EC2 `AssociateAddress` (with `AllowReassociation=true`) moves an
//! elastic IP to this instance or ENI; `DescribeAddresses` verifies it. Requests are EC2 Query
//! API calls signed with SigV4 by AWS's own `aws-sigv4` crate. Credentials come from the
//! usual environment variables or, failing that, the instance role through IMDSv2, which
//! also gives the instance id when none is configured.
//!
//! Release does nothing: the peer's `AssociateAddress` takes the address over, and a
//! demoted node disassociating could take it from the new holder.

use crate::config::AwsEip;
use std::time::{Duration, SystemTime};

const EC2_VERSION: &str = "2016-11-15";

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The headers SigV4 adds to a request (`x-amz-date`, `authorization`, and
/// `x-amz-security-token` / `x-amz-content-sha256` when they apply). `headers` must hold
/// every header that will be sent and signed, `host` included.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    creds: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
    content_sha256_header: bool,
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
    };
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        creds.secret_access_key.clone(),
        creds.session_token.clone(),
        None,
        "tollgate",
    )
    .into();
    let mut settings = SigningSettings::default();
    if content_sha256_header {
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let req = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("SigV4: {e}"))?;
    let (instructions, _) = sign(req, &params)
        .map_err(|e| format!("SigV4: {e}"))?
        .into_parts();
    let (out, _) = instructions.into_parts();
    Ok(out
        .into_iter()
        .map(|h| (h.name().to_string(), h.value().to_string()))
        .collect())
}

/// The first `<tag>…</tag>` in an EC2 XML answer (EC2's answers carry no attributes or
/// CDATA in the fields read here).
pub fn xml_tag<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(body[start..end].trim())
}

/// What an EC2 error answer says: `Code: Message`.
pub fn ec2_error(body: &str) -> Option<String> {
    let code = xml_tag(body, "Code")?;
    Some(match xml_tag(body, "Message") {
        Some(m) => format!("{code}: {m}"),
        None => code.to_string(),
    })
}

/// Who holds the elastic IP, from a `DescribeAddresses` answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holder {
    pub instance_id: Option<String>,
    pub network_interface_id: Option<String>,
    pub public_ip: Option<String>,
}

pub fn parse_describe(body: &str) -> Result<Holder, String> {
    if let Some(e) = ec2_error(body).filter(|_| body.contains("<Errors>")) {
        return Err(e);
    }
    let set = xml_tag(body, "addressesSet")
        .ok_or_else(|| "DescribeAddresses: no addressesSet in the answer".to_string())?;
    let item =
        xml_tag(set, "item").ok_or_else(|| "DescribeAddresses: no such address".to_string())?;
    let field = |t: &str| {
        xml_tag(item, t)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    Ok(Holder {
        instance_id: field("instanceId"),
        network_interface_id: field("networkInterfaceId"),
        public_ip: field("publicIp"),
    })
}

/// Percent-encoding for form values (RFC 3986 unreserved kept), as EC2's Query API wants.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        let mut o = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                o.push(b as char);
            } else {
                o.push_str(&format!("%{b:02X}"));
            }
        }
        o
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A metadata service answer's body; any failure or non-2xx status is an error naming `what`.
async fn imds_body(req: reqwest::RequestBuilder, what: &str) -> Result<String, String> {
    let r = req.send().await.map_err(|e| format!("{what}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{what}: HTTP {}", r.status()));
    }
    r.text().await.map_err(|e| format!("{what}: {e}"))
}

/// The EC2 side of one `aws_eip` claim: the HTTP client and what IMDS told us once.
pub struct Eip {
    pub s: AwsEip,
    http: reqwest::Client,
    instance_id: tokio::sync::OnceCell<String>,
}

impl Eip {
    pub fn new(s: AwsEip) -> Eip {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(true)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Eip {
            s,
            http,
            instance_id: tokio::sync::OnceCell::new(),
        }
    }

    async fn imds_token(&self) -> Result<String, String> {
        imds_body(
            self.http
                .put(format!("{}/latest/api/token", self.s.imds_endpoint))
                .header("X-aws-ec2-metadata-token-ttl-seconds", "21600"),
            "IMDSv2 token",
        )
        .await
    }

    async fn imds_get(&self, token: &str, path: &str) -> Result<String, String> {
        imds_body(
            self.http
                .get(format!("{}/latest/{path}", self.s.imds_endpoint))
                .header("X-aws-ec2-metadata-token", token),
            &format!("IMDS {path}"),
        )
        .await
    }

    /// This instance's id: configured, or from IMDSv2 (asked once).
    pub async fn instance_id(&self) -> Result<String, String> {
        if let Some(id) = &self.s.instance_id {
            return Ok(id.clone());
        }
        self.instance_id
            .get_or_try_init(|| async {
                let token = self.imds_token().await?;
                let id = self.imds_get(&token, "meta-data/instance-id").await?;
                Ok::<_, String>(id.trim().to_string())
            })
            .await
            .cloned()
    }

    /// The usual environment variables, else the instance role's temporary credentials.
    pub async fn credentials(&self) -> Result<Credentials, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: env("AWS_SESSION_TOKEN"),
            });
        }
        let token = self.imds_token().await.map_err(|e| {
            format!("no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and no instance role ({e})")
        })?;
        let roles = self
            .imds_get(&token, "meta-data/iam/security-credentials/")
            .await?;
        let role = roles
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or("the instance has no IAM role")?;
        let body = self
            .imds_get(
                &token,
                &format!("meta-data/iam/security-credentials/{role}"),
            )
            .await?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Role {
            access_key_id: String,
            secret_access_key: String,
            token: Option<String>,
        }
        let r: Role = serde_json::from_str(&body)
            .map_err(|e| format!("IMDS credentials for role {role}: {e}"))?;
        Ok(Credentials {
            access_key_id: r.access_key_id,
            secret_access_key: r.secret_access_key,
            session_token: r.token,
        })
    }

    /// One signed EC2 Query API call; the answer's body, or EC2's error.
    async fn call(&self, params: &[(&str, &str)]) -> Result<String, String> {
        let creds = self.credentials().await?;
        let body = form_encode(params);
        let url = format!("{}/", self.s.endpoint);
        let host = reqwest::Url::parse(&url)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_string(),
                })
            })
            .ok_or_else(|| format!("bad EC2 endpoint {}", self.s.endpoint))?;
        let ctype = "application/x-www-form-urlencoded; charset=utf-8";
        let signed = sign(
            "POST",
            &url,
            &[("host", &host), ("content-type", ctype)],
            body.as_bytes(),
            &creds,
            &self.s.region,
            "ec2",
            SystemTime::now(),
            false,
        )?;
        let mut req = self
            .http
            .post(&url)
            .header("content-type", ctype)
            .body(body);
        for (k, v) in signed {
            req = req.header(k, v);
        }
        let action = params.first().map(|p| p.1).unwrap_or("EC2");
        let r = req.send().await.map_err(|e| format!("{action}: {e}"))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| format!("{action}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{action}: HTTP {status}: {}",
                ec2_error(&text).unwrap_or_else(|| text.chars().take(200).collect())
            ));
        }
        Ok(text)
    }

    /// Move the address here.
    pub async fn associate(&self) -> Result<(), String> {
        let target = match &self.s.network_interface_id {
            Some(eni) => ("NetworkInterfaceId", eni.clone()),
            None => ("InstanceId", self.instance_id().await?),
        };
        let body = self
            .call(&[
                ("Action", "AssociateAddress"),
                ("Version", EC2_VERSION),
                ("AllocationId", &self.s.allocation_id),
                (target.0, &target.1),
                ("AllowReassociation", "true"),
            ])
            .await?;
        match xml_tag(&body, "associationId") {
            Some(_) => Ok(()),
            None if xml_tag(&body, "return") == Some("true") => Ok(()),
            None => Err(format!(
                "AssociateAddress: unexpected answer: {}",
                body.chars().take(200).collect::<String>()
            )),
        }
    }

    /// Who holds the address now.
    pub async fn describe(&self) -> Result<Holder, String> {
        let body = self
            .call(&[
                ("Action", "DescribeAddresses"),
                ("Version", EC2_VERSION),
                ("AllocationId.1", &self.s.allocation_id),
            ])
            .await?;
        parse_describe(&body)
    }

    /// Whether DescribeAddresses shows the address on this instance / ENI.
    pub async fn holds(&self) -> Result<bool, String> {
        let h = self.describe().await?;
        Ok(match &self.s.network_interface_id {
            Some(eni) => h.network_interface_id.as_deref() == Some(eni),
            None => h.instance_id.as_deref() == Some(self.instance_id().await?.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published SigV4 test suite (the `aws-signing-test-suite/v4` cases shipped with
    /// the aws-sigv4 crate and the AWS SDKs): fixed credentials, time and requests, and the
    /// signatures AWS computed.
    fn kat_creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: token.map(str::to_string),
        }
    }

    fn kat_time() -> SystemTime {
        // 2015-08-30T12:36:00Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {h:?}"))
    }

    #[test]
    fn sigv4_known_answer_get_vanilla() {
        let h = sign(
            "GET",
            "https://example.amazonaws.com/",
            &[("host", "example.amazonaws.com")],
            b"",
            &kat_creds(None),
            "us-east-1",
            "service",
            kat_time(),
            false,
        )
        .unwrap();
        assert_eq!(header(&h, "x-amz-date"), "20150830T123600Z");
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn sigv4_known_answer_with_session_token() {
        let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
        let h = sign(
            "GET",
            "https://example.amazonaws.com/",
            &[("host", "example.amazonaws.com")],
            b"",
            &kat_creds(Some(token)),
            "us-east-1",
            "service",
            kat_time(),
            false,
        )
        .unwrap();
        assert_eq!(header(&h, "x-amz-security-token"), token);
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-security-token, \
             Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
        );
    }

    #[test]
    fn sigv4_known_answer_form_post() {
        // post-x-www-form-urlencoded: a signed form body, as EC2's Query API sends
        let h = sign(
            "POST",
            "https://example.amazonaws.com/",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("host", "example.amazonaws.com"),
                ("content-length", "13"),
            ],
            b"Param1=value1",
            &kat_creds(None),
            "us-east-1",
            "service",
            kat_time(),
            true,
        )
        .unwrap();
        assert_eq!(
            header(&h, "x-amz-content-sha256"),
            "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
        );
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, \
             Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"
        );
    }

    #[test]
    fn describe_addresses_answers_and_errors() {
        let ok = r#"<DescribeAddressesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>x</requestId>
  <addressesSet>
    <item>
      <publicIp>198.51.100.7</publicIp>
      <allocationId>eipalloc-1</allocationId>
      <domain>vpc</domain>
      <instanceId>i-abc</instanceId>
      <associationId>eipassoc-1</associationId>
      <networkInterfaceId>eni-9</networkInterfaceId>
      <tagSet><item><key>role</key><value>edge</value></item></tagSet>
    </item>
  </addressesSet>
</DescribeAddressesResponse>"#;
        assert_eq!(
            parse_describe(ok).unwrap(),
            Holder {
                instance_id: Some("i-abc".into()),
                network_interface_id: Some("eni-9".into()),
                public_ip: Some("198.51.100.7".into()),
            }
        );
        let free = "<DescribeAddressesResponse><addressesSet><item><publicIp>198.51.100.7</publicIp><instanceId/></item></addressesSet></DescribeAddressesResponse>";
        assert_eq!(parse_describe(free).unwrap().instance_id, None);
        let err = "<Response><Errors><Error><Code>InvalidAllocationID.NotFound</Code><Message>no eipalloc-2</Message></Error></Errors></Response>";
        assert_eq!(
            parse_describe(err).unwrap_err(),
            "InvalidAllocationID.NotFound: no eipalloc-2"
        );
        let none = "<DescribeAddressesResponse><addressesSet/></DescribeAddressesResponse>";
        assert!(parse_describe(none).is_err());
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(
            form_encode(&[("Action", "AssociateAddress"), ("X.1", "a b/c+d")]),
            "Action=AssociateAddress&X.1=a%20b%2Fc%2Bd"
        );
    }
}
