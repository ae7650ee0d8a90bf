//! README's first command: `bash demo.sh` runs the product on a throwaway pair of local
//! servers with a sample workload and shows the rows arrive, identical per tenant.

use std::process::Command;

#[test]
fn demo_shows_the_rows_arrive() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let out = Command::new("bash")
        .arg("demo.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("KVSZ_BIN", env!("CARGO_BIN_EXE_kuvasz-streamer"))
        .env("KVSZ_DEMO_HTTP_PORT", port.to_string())
        .output()
        .expect("run demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo.sh failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "readyz: {\"ready\":true,\"reasons\":[]}",
        "kuvasz_source_state{database=\"shop\",sid=\"tenant1\",state=\"streaming\"} 1",
        "kuvasz_source_state{database=\"shop\",sid=\"tenant2\",state=\"streaming\"} 1",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} not in\n{stdout}"
        );
    }
    for tenant in ["tenant1", "tenant2"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{tenant}: identical ("))),
            "{tenant} not identical:\n{stdout}"
        );
    }
}
