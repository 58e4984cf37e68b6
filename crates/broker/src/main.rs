//! `dispatch-broker`: being written.
fn main() {}
