//! husk's end-to-end suites live in this package's tests (see Cargo.toml); they boot real Linux
//! guests with `husk` and need real KVM, so `make test-e2e` runs them in the nested test host.
