//! The checked queries' offline data (`.sqlx/`) must match the migrations:
//! `.ci/check-sqlx`, which CI runs, fails when it does not.

use std::process::Command;

/// A schema change the committed `.sqlx/` does not know of (as a new migration
/// whose queries were not prepared again would be) fails the check, naming
/// the query whose description differs. Needs `cargo sqlx` (sqlx-cli), which
/// `.ci/run` installs.
#[test]
fn a_stale_sqlx_directory_fails_the_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let sqlx = Command::new(&cargo).args(["sqlx", "--version"]).output();
    assert!(sqlx.is_ok_and(|o| o.status.success()), "cargo sqlx is missing: cargo install sqlx-cli (see .ci/run)");

    let stale = tempfile::NamedTempFile::new().unwrap();
    // Same Rust type (String), another column type: only the description changes.
    std::fs::write(stale.path(), "alter table inventory alter column title type varchar(300);\n").unwrap();
    let output = Command::new("bash")
        .arg(format!("{root}/.ci/check-sqlx"))
        .arg("--with")
        .arg(stale.path())
        .env_remove("DATABASE_URL")
        .output()
        .expect("run .ci/check-sqlx");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "the check passed a stale .sqlx/:\n{said}");
    assert!(
        said.contains("prepare check failed: one or more query files differ"),
        "it failed for another reason:\n{said}"
    );
}
