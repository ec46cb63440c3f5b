//! The live status page at the admin root, in a real browser: Debian's
//! chromium, headless, in the testbed's gateway namespace (where the admin
//! server listens). It loads the page, which fetches `/status` with its own
//! script, and the test reads the DOM the script built, and takes a
//! screenshot. Needs root, and chromium (`cargo xtask setup`).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use lb_tests::{
    Testbed,
    agent::{self, Agent, HealthCheck},
};

const BACKENDS: usize = 3;

/// Runs headless chromium on the page in the gateway namespace: the DOM
/// after the page's script ran (virtual time lets its first fetch and render
/// finish), and a screenshot at `screenshot`.
fn load_page(testbed: &Testbed, profile: &Path, screenshot: &Path) -> String {
    let url = format!("http://{}/", agent::ADMIN);
    let run = |extra: &[String]| {
        let out = testbed
            .gateway()
            .command("chromium")
            .args([
                "--headless",
                // As root, chromium runs only without its sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                // 3 s of virtual time: the page's first fetch and render, not its refreshes.
                "--virtual-time-budget=3000",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium (Debian package chromium; `cargo xtask setup` installs it)");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = run(&["--dump-dom".to_owned()]);
    run(&[format!("--screenshot={}", screenshot.display())]);
    dom
}

/// The `data-health` of the row for `backend` of VIP `vip` in `dom`.
fn row_health(dom: &str, vip: &str, backend: &str) -> Option<String> {
    let needle = format!("data-vip=\"{vip}\" data-backend=\"{backend}\" data-health=\"");
    let start = dom.find(&needle)? + needle.len();
    Some(dom[start..].split('"').next()?.to_owned())
}

#[test]
#[ignore = "needs root: `cargo xtask test` runs it"]
fn the_status_page_shows_a_killed_backend_down_within_the_check_bound() {
    lb_tests::require_root!();
    let testbed = Testbed::new(BACKENDS).expect("building the testbed");
    let check = HealthCheck::default();
    let mut agent = Agent::start(&testbed, &agent::config_for(&testbed, check)).expect("starting lb");
    agent.wait_health("web", &["up"; BACKENDS], Duration::from_secs(10)).expect("web backends up");
    let scratch = std::env::temp_dir().join(format!("lb-status-page-{}", testbed.id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let screenshot = scratch.join("status.png");

    let dom = load_page(&testbed, &scratch.join("profile"), &screenshot);
    for i in 1..=BACKENDS {
        let address = testbed.backend_http(i).to_string();
        assert_eq!(row_health(&dom, "web", &address).as_deref(), Some("up"), "backend {i} in:\n{dom}");
    }
    assert!(dom.contains("config generation 1"), "the page's header line:\n{dom}");

    testbed.stop_backend(3).expect("stopping backend 3");
    let killed = Instant::now();
    let dead = testbed.backend_http(3).to_string();
    // The health-check bound (fall × interval + timeout), plus the page's
    // load, doubled for a loaded 2-core machine.
    let bound = (check.detection_bound() + Duration::from_secs(3)) * 2;
    let dom = loop {
        let dom = load_page(&testbed, &scratch.join("profile"), &screenshot);
        if row_health(&dom, "web", &dead).as_deref() == Some("down") {
            break dom;
        }
        assert!(killed.elapsed() < bound, "backend 3 not shown down within {bound:?}:\n{dom}");
    };
    println!("status page: backend 3 shown down {:?} after it was killed", killed.elapsed());
    // The event list says so too, and the other backends are still up.
    assert!(dom.contains(&format!("{dead} (id")) && dom.contains("up -&gt; down"), "recent events:\n{dom}");
    assert_eq!(row_health(&dom, "web", &testbed.backend_http(1).to_string()).as_deref(), Some("up"));
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG"), "a real screenshot: {} bytes", png.len());
    // LB_TEST_KEEP_SCREENSHOT=1 keeps it for a person to look at.
    if std::env::var_os("LB_TEST_KEEP_SCREENSHOT").is_some() {
        println!("screenshot kept: {}", screenshot.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
