//! A throwaway certificate authority for HTTPS tests, made with Debian's
//! `openssl` command at test time: a CA and one server certificate signed by
//! it, for the names given. Nothing is kept: the files live in a directory
//! of their own, removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context as _, ensure};

/// The files of a test CA and its one server certificate.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
    /// The CA's certificate (PEM): what a verifying client trusts.
    pub ca: PathBuf,
    /// The server certificate (PEM), signed by the CA.
    pub cert: PathBuf,
    /// The server certificate's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TestCa {
    /// Whether the `openssl` command is there to make certificates.
    #[must_use]
    pub fn available() -> bool {
        Command::new("openssl").arg("version").output().is_ok_and(|out| out.status.success())
    }

    /// A CA and a server certificate for the DNS names `names` (P-256 keys,
    /// valid for two days), in a new directory under the temp dir.
    ///
    /// # Errors
    ///
    /// When `openssl` is missing or fails; the error has its stderr.
    pub fn generate(names: &[&str]) -> anyhow::Result<Self> {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lb-tests-tls-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = TestCa { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem"), dir };
        let ca_key = ca.dir.join("ca-key.pem");
        let csr = ca.dir.join("cert.csr");
        let ext = ca.dir.join("cert.ext");
        let san: Vec<String> = names.iter().map(|name| format!("DNS:{name}")).collect();
        // A leaf that is not a CA: webpki refuses a CA certificate as an end entity.
        fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\n",
                san.join(",")
            ),
        )
        .with_context(|| format!("writing {}", ext.display()))?;
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[&["req", "-x509"], &p256[..], &["-days", "2", "-subj", "/CN=lb-tests CA"]],
            &[("-keyout", &ca_key), ("-out", &ca.ca)],
        )?;
        let subject = format!("/CN={}", names.first().copied().unwrap_or("lb-tests"));
        openssl(&[&["req"], &p256[..], &["-subj", &subject]], &[("-keyout", &ca.key), ("-out", &csr)])?;
        openssl(
            &[&["x509", "-req", "-days", "2", "-set_serial", "2"]],
            &[("-in", &csr), ("-CA", &ca.ca), ("-CAkey", &ca_key), ("-extfile", &ext), ("-out", &ca.cert)],
        )?;
        Ok(ca)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `openssl` with the argument groups `args` then each `(flag, path)`.
fn openssl(args: &[&[&str]], files: &[(&str, &Path)]) -> anyhow::Result<()> {
    let mut cmd = Command::new("openssl");
    for group in args {
        cmd.args(*group);
    }
    for (flag, path) in files {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.output().context("running openssl (Debian package openssl)")?;
    ensure!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}
