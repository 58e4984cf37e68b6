//! End-to-end tests across the services live beside this file; the library is empty.
