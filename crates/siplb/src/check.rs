//! `siplb check`: the SIP layer's verdict on message files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Checks one message: the status line to print on success, or the reason.
pub fn verdict(bytes: &[u8], max_size: usize) -> Result<String, sip::Error> {
    if bytes.len() > max_size {
        return Err(sip::Error::TooLarge {
            max: u32::try_from(max_size).unwrap_or(u32::MAX),
        });
    }
    let msg = sip::Message::parse(bytes)?;
    msg.validate()?;
    let what = match msg.start_line() {
        sip::StartLine::Request { method, .. } => method.to_string(),
        sip::StartLine::Response { code, .. } => code.to_string(),
    };
    Ok(format!(
        "OK {what} call-id={}",
        String::from_utf8_lossy(msg.call_id())
    ))
}

fn check_file(path: &Path, max_size: usize) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    verdict(&bytes, max_size).map_err(|e| e.to_string())
}

/// Runs the subcommand; exit 0 when every file is OK, else 1.
pub fn run(files: &[PathBuf], max_size: usize) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let mut all_ok = true;
    for f in files {
        let line = match check_file(f, max_size) {
            Ok(ok) => ok,
            Err(reason) => {
                all_ok = false;
                format!("ERROR {}: {reason}", f.display())
            }
        };
        if writeln!(stdout, "{line}").is_err() {
            return ExitCode::from(1);
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
