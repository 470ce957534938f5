//! The control protocol between `meshctl` and `meshd` over the Unix control socket: one JSON
//! request line, one JSON response line. Plus the pure rendering helpers meshctl uses.
//! TO BE IMPLEMENTED by helper.
