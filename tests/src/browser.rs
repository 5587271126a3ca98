//! A real browser for the tests: Debian's headless Chromium renders a page inside a network
//! namespace of its own (a one-host lab, nothing routed beyond it), so that nothing it
//! might try to reach (updates, safe browsing) leaves the machine. The namespace and every
//! process in it go when the render ends, also on failure.

use std::path::Path;

use crate::lab::Lab;

/// The headless Chromium programs Debian ships, the lighter first.
const BROWSERS: [&str; 2] = ["chromium-headless-shell", "chromium"];

/// Gives up on a render after this long.
const RENDER_SECS: &str = "90";

/// What the browser made of a page.
pub struct Rendered {
    /// The DOM as the browser built it (`--dump-dom`), after parsing and layout.
    pub dom: String,
    /// The PNG screenshot's bytes.
    pub png: Vec<u8>,
}

/// Renders the file `page` to a PNG at `png` and dumps its DOM.
pub fn render(page: &Path, png: &Path) -> Result<Rendered, String> {
    let browser = BROWSERS
        .iter()
        .find(|b| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or(
            "no headless Chromium: install Debian's chromium-headless-shell (deploy/setup.sh)",
        )?;
    let profile = tempfile::tempdir().map_err(|e| format!("a profile dir: {e}"))?;
    let lab = Lab::new(&["browser"]);
    let url = format!("file://{}", page.display());
    let run = |extra: &[String]| -> Result<Vec<u8>, String> {
        let mut cmd = lab.command("browser", "timeout");
        cmd.args([RENDER_SECS, browser])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,2400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url);
        let out = cmd.output().map_err(|e| format!("{browser}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{browser} exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    };
    run(&[format!("--screenshot={}", png.display())])?;
    let png = std::fs::read(png).map_err(|e| format!("the screenshot {}: {e}", png.display()))?;
    let dom = String::from_utf8_lossy(&run(&["--dump-dom".to_string()])?).into_owned();
    Ok(Rendered { dom, png })
}
