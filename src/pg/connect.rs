//! The one place connections to PostgreSQL are opened: SQL sessions to a source or to
//! the destination, destination sessions with the daemon's settings, and replication
//! connections. Every session of an endpoint gets the same application_name and the
//! same TLS (see [`super::tls`]), whoever opens it.

use postgres::config::SslMode as PgSslMode;
use postgres::tls::{MakeTlsConnect, NoTlsStream};
use postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::ConnInfo;
use super::replication::{PgError, ReplicationConnection};
use super::session;
use super::tls::TlsSetup;

/// A server and database the daemon talks to, and the name its sessions carry.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub info: ConnInfo,
    /// `application_name` of every session (`server.name`), so DBAs see them in
    /// pg_stat_activity.
    pub application_name: String,
}

impl Endpoint {
    pub fn new(info: ConnInfo, application_name: &str) -> Endpoint {
        Endpoint {
            info,
            application_name: application_name.to_string(),
        }
    }

    /// The URL without its password, for every message about this endpoint.
    pub fn redacted(&self) -> String {
        self.info.redacted()
    }

    /// The same server, database `dbname`.
    pub fn with_dbname(&self, dbname: &str) -> Endpoint {
        let mut e = self.clone();
        e.info.dbname = dbname.to_string();
        e
    }

    /// A plain SQL session.
    pub fn sql(&self) -> Result<Client, postgres::Error> {
        let mut cfg = self.info.to_postgres_config();
        cfg.application_name(&self.application_name);
        match TlsSetup::for_conninfo(&self.info) {
            Ok(setup) => match setup.client_config() {
                Some(config) => cfg.connect(MakeRustlsConnect::new((**config).clone())),
                None => {
                    // Unix sockets: no SSLRequest at all, as libpq.
                    cfg.ssl_mode(PgSslMode::Disable);
                    cfg.connect(NoTls)
                }
            },
            // postgres::Error cannot be made here; the connector hands the reason over
            // once the socket is open ("error performing TLS handshake: <reason>").
            Err(e) => cfg.connect(Unusable(e.to_string())),
        }
    }

    /// A session that writes target tables (see [`session::prepare_destination`]).
    pub fn destination(&self) -> Result<Client, postgres::Error> {
        let mut client = self.sql()?;
        session::prepare_destination(&mut client, &self.info.tcp())?;
        Ok(client)
    }

    /// A walsender session (`replication=database`).
    pub fn replication(&self) -> Result<ReplicationConnection, PgError> {
        let tls = TlsSetup::for_conninfo(&self.info).map_err(|e| PgError::Tls(e.to_string()))?;
        ReplicationConnection::connect(&self.info, &self.application_name, &tls)
    }
}

/// A TLS connector for settings that cannot be followed (a missing certificate file...):
/// every connection attempt fails with the reason.
struct Unusable(String);

impl<S> MakeTlsConnect<S> for Unusable {
    type Stream = NoTlsStream;
    type TlsConnect = NoTls;
    type Error = String;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<NoTls, String> {
        Err(self.0.clone())
    }
}
