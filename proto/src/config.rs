//! meshd's TOML configuration (`/etc/meshd/meshd.toml`): types, parsing and validation.
//! Pure: the daemon reads the file and hands the text and its path here.
//! TO BE IMPLEMENTED by helper.
