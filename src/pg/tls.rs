//! TLS for every connection, configured from libpq's own parameters (`sslmode`,
//! `sslrootcert`, `sslcert`, `sslkey`, `sslcertmode`, `sslcrl`, `sslcrldir`, `sslsni`,
//! `ssl_min_protocol_version`, `ssl_max_protocol_version`, `sslnegotiation`,
//! `channel_binding`), so a URL means to the daemon what it means to psql. rustls rather
//! than OpenSSL, so the packages depend on no libssl.
//!
//! What each `sslmode` checks, as libpq does:
//! - `disable`: no TLS; `allow` and `prefer`: TLS when the server offers it;
//!   `require`: TLS or no connection. None of these three checks the server's
//!   certificate unless a root certificate is given (`sslrootcert`, or
//!   `~/.postgresql/root.crt` exists): then its chain is checked, as `verify-ca` does.
//! - `verify-ca`: the chain must lead to a root certificate; `verify-full`: and the
//!   certificate must name the host (DNS or IP subject alternative name).
//!
//! Certificate files are read at each connection attempt, so a renewed certificate is
//! used from the next connection on, without a restart.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{SignatureScheme, SupportedProtocolVersion};

use super::conninfo::ConnInfo;

/// The ALPN protocol PostgreSQL 17+ requires with `sslnegotiation=direct`; older servers
/// ignore it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Where a Debian or RPM system keeps its CA bundle (`sslrootcert=system`), unless
/// `SSL_CERT_FILE` names another.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// libpq's `sslmode`, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }
}

/// libpq's `channel_binding`: whether SCRAM binds the authentication to the TLS channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBindingMode {
    Disable,
    Prefer,
    Require,
}

/// How one endpoint's connections negotiate TLS and authenticate over it.
#[derive(Clone)]
pub struct TlsSetup {
    pub mode: SslMode,
    /// `sslnegotiation=direct`: TLS from the first byte (PostgreSQL 17+), no SSLRequest.
    pub direct: bool,
    pub channel_binding: ChannelBindingMode,
    /// `None` when no TLS is to be tried (`sslmode=disable`, Unix sockets).
    config: Option<Arc<ClientConfig>>,
}

/// A TLS setting that cannot be followed. Names the parameter and file; never a password.
#[derive(Debug)]
pub enum TlsError {
    File {
        param: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// A file that should hold PEM certificates, keys or CRLs holds none.
    NoPem {
        param: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    EncryptedKey(PathBuf),
    /// `verify-ca`/`verify-full` with no root certificate to verify against.
    NoRootCertificate(SslMode),
    /// `sslrootcert=system` with a mode that would not check the host name.
    SystemRootsNeedVerifyFull(SslMode),
    /// `sslcertmode=require` without a client certificate.
    NoClientCertificate,
    Invalid {
        param: &'static str,
        value: String,
        why: &'static str,
    },
    Rustls(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::File { param, path, error } => {
                write!(f, "{param} {}: {error}", path.display())
            }
            TlsError::NoPem { param, path, what } => {
                write!(f, "{param} {}: no PEM {what} in it", path.display())
            }
            TlsError::EncryptedKey(path) => write!(
                f,
                "sslkey {}: encrypted private keys are not supported; decrypt it \
                 (openssl pkey -in KEY -out PLAIN_KEY) and keep it mode 0600",
                path.display()
            ),
            TlsError::NoRootCertificate(mode) => write!(
                f,
                "sslmode={} needs a root certificate to verify the server against: set \
                 sslrootcert=FILE (PEM) or sslrootcert=system; ~/.postgresql/root.crt does \
                 not exist",
                mode.as_str()
            ),
            TlsError::SystemRootsNeedVerifyFull(mode) => write!(
                f,
                "sslrootcert=system requires sslmode=verify-full (is {}): a public CA \
                 vouches for names, not for servers",
                mode.as_str()
            ),
            TlsError::NoClientCertificate => write!(
                f,
                "sslcertmode=require but no client certificate: set sslcert and sslkey"
            ),
            TlsError::Invalid { param, value, why } => {
                write!(f, "{param}={value}: {why}")
            }
            TlsError::Rustls(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl TlsSetup {
    /// No TLS at all.
    pub fn disabled() -> TlsSetup {
        TlsSetup {
            mode: SslMode::Disable,
            direct: false,
            channel_binding: ChannelBindingMode::Prefer,
            config: None,
        }
    }

    /// The TLS setup `info`'s parameters ask for, reading the files they name (and
    /// libpq's defaults under `~/.postgresql/` when they exist).
    pub fn for_conninfo(info: &ConnInfo) -> Result<TlsSetup, TlsError> {
        Self::build(info, home().as_deref())
    }

    /// `sslmode`, defaulting as libpq 16+ does: `verify-full` with the system's CAs
    /// (`sslrootcert=system`, which refuses weaker modes), else `prefer`.
    fn mode(info: &ConnInfo) -> Result<SslMode, TlsError> {
        let system_roots = info.option("sslrootcert") == Some("system");
        let mode = match info.option("sslmode") {
            Some(m) => SslMode::parse(m).ok_or_else(|| TlsError::Invalid {
                param: "sslmode",
                value: m.to_string(),
                why: "expected disable, allow, prefer, require, verify-ca or verify-full",
            })?,
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system_roots && mode != SslMode::VerifyFull {
            return Err(TlsError::SystemRootsNeedVerifyFull(mode));
        }
        Ok(mode)
    }

    fn build(info: &ConnInfo, home: Option<&Path>) -> Result<TlsSetup, TlsError> {
        let root_param = info.option("sslrootcert");
        let mode = Self::mode(info)?;
        let channel_binding = match info.option("channel_binding") {
            None | Some("prefer") => ChannelBindingMode::Prefer,
            Some("disable") => ChannelBindingMode::Disable,
            Some("require") => ChannelBindingMode::Require,
            Some(v) => {
                return Err(TlsError::Invalid {
                    param: "channel_binding",
                    value: v.to_string(),
                    why: "expected disable, prefer or require",
                })
            }
        };
        let direct = match info.option("sslnegotiation") {
            None | Some("postgres") => false,
            Some("direct") if mode.requires_tls() => true,
            Some("direct") => {
                return Err(TlsError::Invalid {
                    param: "sslnegotiation",
                    value: "direct".to_string(),
                    why: "needs sslmode=require or stricter (a direct TLS handshake cannot \
                          fall back to plain text)",
                })
            }
            Some(v) => {
                return Err(TlsError::Invalid {
                    param: "sslnegotiation",
                    value: v.to_string(),
                    why: "expected postgres or direct",
                })
            }
        };
        let mut setup = TlsSetup {
            mode,
            direct,
            channel_binding,
            config: None,
        };
        // PostgreSQL speaks no TLS on Unix sockets, whatever the mode (libpq alike).
        if mode == SslMode::Disable || info.is_unix_socket() {
            return Ok(setup);
        }

        // ring rather than aws-lc-rs (which needs cmake and a C toolchain to build);
        // rustls 0.23.48 deprecates it only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(crypto::ring::default_provider());
        let roots = match root_param {
            Some("system") => Some(system_root_file()?),
            Some(path) => Some(PathBuf::from(path)),
            None => home
                .map(|h| h.join(".postgresql/root.crt"))
                .filter(|p| p.exists()),
        };
        let chain = match roots {
            Some(path) => {
                let store = root_store(&path, root_param.is_some())?;
                let mut builder =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone());
                let crls = crls(info)?;
                if !crls.is_empty() {
                    builder = builder.with_crls(crls);
                }
                Some(builder.build().map_err(|e| {
                    TlsError::Rustls(rustls::Error::General(format!("root certificates: {e}")))
                })?)
            }
            None if mode >= SslMode::VerifyCa => return Err(TlsError::NoRootCertificate(mode)),
            None => None,
        };
        let verifier = Arc::new(ModeVerifier {
            provider: provider.clone(),
            chain,
            check_name: mode == SslMode::VerifyFull,
        });

        let versions = protocol_versions(info)?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(TlsError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_certificate(info, home)? {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(TlsError::Rustls)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        config.enable_sni = info.option("sslsni") != Some("0");
        setup.config = Some(Arc::new(config));
        Ok(setup)
    }

    /// The rustls configuration, or `None` when no TLS is to be tried.
    pub fn client_config(&self) -> Option<&Arc<ClientConfig>> {
        self.config.as_ref()
    }
}

/// The home directory libpq looks under for `~/.postgresql/`.
fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn read(param: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::File {
        param,
        path: path.to_path_buf(),
        error,
    })
}

fn system_root_file() -> Result<PathBuf, TlsError> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        return Ok(PathBuf::from(file));
    }
    SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| TlsError::File {
            param: "sslrootcert",
            path: PathBuf::from("system"),
            error: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no system CA bundle ({}); install ca-certificates or set SSL_CERT_FILE",
                    SYSTEM_BUNDLES.join(", ")
                ),
            ),
        })
}

/// The root certificates in `path`. `explicit`: named by `sslrootcert` rather than found
/// at libpq's default place (only used to word errors).
fn root_store(path: &Path, explicit: bool) -> Result<RootCertStore, TlsError> {
    let param = if explicit {
        "sslrootcert"
    } else {
        "sslrootcert (default)"
    };
    let pem = read(param, path)?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Invalid {
            param,
            value: path.display().to_string(),
            why: pem_why(&e),
        })?;
        // A bundle may hold certificates webpki cannot use (old or odd ones); the
        // others still count, as with OpenSSL.
        let _ = store.add(cert);
    }
    if store.is_empty() {
        return Err(TlsError::NoPem {
            param,
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(store)
}

fn pem_why(e: &rustls::pki_types::pem::Error) -> &'static str {
    match e {
        rustls::pki_types::pem::Error::Io(_) => "cannot be read",
        _ => "is not valid PEM",
    }
}

/// Revocation lists of `sslcrl` (a PEM file) and `sslcrldir` (every file in it).
fn crls(info: &ConnInfo) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut files = Vec::new();
    if let Some(f) = info.option("sslcrl").filter(|f| !f.is_empty()) {
        files.push(("sslcrl", PathBuf::from(f)));
    }
    if let Some(d) = info.option("sslcrldir").filter(|d| !d.is_empty()) {
        let entries = fs::read_dir(d).map_err(|error| TlsError::File {
            param: "sslcrldir",
            path: PathBuf::from(d),
            error,
        })?;
        for entry in entries.flatten() {
            if entry.path().is_file() {
                files.push(("sslcrldir", entry.path()));
            }
        }
    }
    let mut out = Vec::new();
    for (param, path) in files {
        let pem = read(param, &path)?;
        let before = out.len();
        for crl in CertificateRevocationListDer::pem_slice_iter(&pem) {
            out.push(crl.map_err(|e| TlsError::Invalid {
                param,
                value: path.display().to_string(),
                why: pem_why(&e),
            })?);
        }
        if out.len() == before && param == "sslcrl" {
            return Err(TlsError::NoPem {
                param,
                path,
                what: "certificate revocation list",
            });
        }
    }
    Ok(out)
}

/// `ssl_min_protocol_version`/`ssl_max_protocol_version` (libpq's default minimum is
/// TLSv1.2); rustls speaks TLS 1.2 and 1.3 only.
fn protocol_versions(info: &ConnInfo) -> Result<Vec<&'static SupportedProtocolVersion>, TlsError> {
    fn rank(param: &'static str, v: &str) -> Result<u8, TlsError> {
        match v {
            "TLSv1" => Ok(0),
            "TLSv1.1" => Ok(1),
            "TLSv1.2" => Ok(2),
            "TLSv1.3" => Ok(3),
            _ => Err(TlsError::Invalid {
                param,
                value: v.to_string(),
                why: "expected TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3",
            }),
        }
    }
    let min = match info.option("ssl_min_protocol_version") {
        Some(v) if !v.is_empty() => rank("ssl_min_protocol_version", v)?,
        _ => 2,
    };
    let max = match info.option("ssl_max_protocol_version") {
        Some(v) if !v.is_empty() => rank("ssl_max_protocol_version", v)?,
        _ => 3,
    };
    let versions: Vec<_> = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(rank, _)| (min..=max).contains(rank))
        .map(|(_, v)| v)
        .collect();
    if versions.is_empty() {
        return Err(TlsError::Invalid {
            param: "ssl_max_protocol_version",
            value: info
                .option("ssl_max_protocol_version")
                .unwrap_or_default()
                .to_string(),
            why: "leaves no protocol version this build speaks (TLSv1.2, TLSv1.3)",
        });
    }
    Ok(versions)
}

type ClientCertificate = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate and key of `sslcert`/`sslkey` (default
/// `~/.postgresql/postgresql.crt` and `.key` when the certificate exists), unless
/// `sslcertmode=disable`.
fn client_certificate(
    info: &ConnInfo,
    home: Option<&Path>,
) -> Result<Option<ClientCertificate>, TlsError> {
    let certmode = info.option("sslcertmode").unwrap_or("allow");
    if !matches!(certmode, "disable" | "allow" | "require") {
        return Err(TlsError::Invalid {
            param: "sslcertmode",
            value: certmode.to_string(),
            why: "expected disable, allow or require",
        });
    }
    if certmode == "disable" {
        return Ok(None);
    }
    let default = |name: &str| home.map(|h| h.join(".postgresql").join(name));
    let cert_path = match info.option("sslcert").filter(|c| !c.is_empty()) {
        Some(c) => Some(PathBuf::from(c)),
        None => default("postgresql.crt").filter(|p| p.exists()),
    };
    let Some(cert_path) = cert_path else {
        if certmode == "require" {
            return Err(TlsError::NoClientCertificate);
        }
        return Ok(None);
    };
    let pem = read("sslcert", &cert_path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            param: "sslcert",
            value: cert_path.display().to_string(),
            why: pem_why(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            param: "sslcert",
            path: cert_path,
            what: "certificate",
        });
    }
    let key_path = match info.option("sslkey").filter(|k| !k.is_empty()) {
        Some(k) => PathBuf::from(k),
        None => default("postgresql.key").unwrap_or_else(|| PathBuf::from("postgresql.key")),
    };
    let pem = read("sslkey", &key_path)?;
    if pem.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED") {
        return Err(TlsError::EncryptedKey(key_path));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoPem {
        param: "sslkey",
        path: key_path,
        what: "private key",
    })?;
    Ok(Some((certs, key)))
}

/// Checks the server's certificate as the mode asks. Without a root certificate
/// (`require` and weaker), any certificate is taken, as libpq does; with one, its chain
/// must lead there, and under `verify-full` it must name the host. The handshake's
/// signatures are checked in every case, so the session is encrypted to whoever holds
/// the certificate's key.
#[derive(Debug)]
struct ModeVerifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for ModeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the name last, after the chain and revocation.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// SCRAM's `tls-server-end-point` channel binding data (RFC 5929): the server
/// certificate hashed with its signature's hash (SHA-1 and MD5 become SHA-256); `None`
/// for signature algorithms without one (Ed25519), where PostgreSQL offers no binding.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::oid::db::rfc5912;
    use x509_cert::der::Decode;
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let oid = parsed.signature_algorithm.oid;
    if [
        rfc5912::SHA_1_WITH_RSA_ENCRYPTION,
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_256,
        rfc5912::ID_RSASSA_PSS,
    ]
    .contains(&oid)
    {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if [
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_384,
    ]
    .contains(&oid)
    {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if [
        rfc5912::SHA_512_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_512,
    ]
    .contains(&oid)
    {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(url: &str) -> ConnInfo {
        ConnInfo::parse(url).unwrap()
    }

    fn setup(url: &str) -> Result<TlsSetup, TlsError> {
        TlsSetup::build(&info(url), None)
    }

    #[test]
    fn modes_and_defaults() {
        let s = setup("postgres://u@h/db").unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert!(s.client_config().is_some(), "prefer tries TLS");
        assert_eq!(s.channel_binding, ChannelBindingMode::Prefer);
        let s = setup("postgres://u@h/db?sslmode=disable").unwrap();
        assert!(s.client_config().is_none());
        let s = setup("postgres://u@h/db?sslmode=require&channel_binding=require").unwrap();
        assert_eq!(s.mode, SslMode::Require);
        assert_eq!(s.channel_binding, ChannelBindingMode::Require);
        let s = setup("host=/tmp user=u dbname=db sslmode=require").unwrap();
        assert!(s.client_config().is_none(), "no TLS over Unix sockets");
    }

    #[test]
    fn refusals_say_what_to_change() {
        let e = setup("postgres://u@h/db?sslmode=verify-full")
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "sslmode=verify-full needs a root certificate to verify the server against: set \
             sslrootcert=FILE (PEM) or sslrootcert=system; ~/.postgresql/root.crt does not exist"
        );
        let e = setup("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("sslrootcert /nonexistent/ca.pem: No such file"),
            "{e}"
        );
        let e = setup("postgres://u@h/db?sslmode=require&sslrootcert=system")
            .err()
            .unwrap();
        assert!(matches!(
            e,
            TlsError::SystemRootsNeedVerifyFull(SslMode::Require)
        ));
        let e = setup("postgres://u@h/db?sslmode=prefer&sslnegotiation=direct")
            .err()
            .unwrap();
        assert!(e
            .to_string()
            .starts_with("sslnegotiation=direct: needs sslmode=require"));
        let e = setup("postgres://u@h/db?sslmode=require&ssl_max_protocol_version=TLSv1.1")
            .err()
            .unwrap();
        assert!(e.to_string().contains("leaves no protocol version"), "{e}");
        let e = setup("postgres://u@h/db?sslcertmode=require")
            .err()
            .unwrap();
        assert!(matches!(e, TlsError::NoClientCertificate));
    }

    #[test]
    fn system_roots_default_to_verify_full() {
        let mode = |url: &str| TlsSetup::mode(&info(url)).map_err(|e| e.to_string());
        assert_eq!(
            mode("postgres://u@h/db?sslrootcert=system"),
            Ok(SslMode::VerifyFull)
        );
        assert_eq!(
            mode("postgres://u@h/db?sslrootcert=/ca.pem"),
            Ok(SslMode::Prefer)
        );
        assert_eq!(
            mode("postgres://u@h/db?sslrootcert=system&sslmode=verify-ca"),
            Err(
                "sslrootcert=system requires sslmode=verify-full (is verify-ca): a public CA \
                 vouches for names, not for servers"
                    .to_string()
            )
        );
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("kvsz-tls-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("c.pem");
        let key = dir.join("k.pem");
        fs::write(&cert, "no pem here\n").unwrap();
        fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let url = format!(
            "postgres://u@h/db?sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        );
        let e = setup(&url).err().unwrap();
        assert!(
            matches!(
                e,
                TlsError::NoPem {
                    param: "sslcert",
                    ..
                }
            ),
            "{e}"
        );
        let e = setup(&format!("{url}&sslcertmode=disable"));
        assert!(e.is_ok(), "sslcertmode=disable reads no client certificate");
        let _ = fs::remove_dir_all(&dir);
    }
}
