//! Helpers shared by the integration tests of the `nightingale` package (each test crate
//! uses some of them).
#![allow(dead_code)]

use std::path::Path;

/// Copies a folder tree (a bundle) into a test's temporary repository.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// An audit record's `detail` as its `key=value` pairs.
pub fn detail_pairs(detail: Option<&str>) -> std::collections::BTreeMap<String, String> {
    detail
        .unwrap_or("")
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
