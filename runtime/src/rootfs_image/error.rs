//! What can go wrong turning a root file system directory into a disk image, with the path or
//! the tool concerned in each message.

use std::path::PathBuf;

/// An error from [`super::RootfsImages`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle's root file system directory does not exist.
    #[error("root file system {0} does not exist")]
    RootfsMissing(PathBuf),
    /// The bundle's root file system is something other than a directory.
    #[error("root file system {0} is not a directory")]
    RootfsNotDirectory(PathBuf),
    /// An entry of the tree could not be read while computing its cache key.
    #[error("reading {path} in the root file system: {source}")]
    Walk { path: PathBuf, source: std::io::Error },
    /// The tool that builds the image is not installed.
    #[error("{tool} is not installed (Debian package {package})")]
    MkfsMissing { tool: &'static str, package: &'static str },
    /// The tool that builds the image ran and failed.
    #[error("{tool} failed to build an image of {rootfs} ({status}): {stderr}")]
    MkfsFailed { tool: &'static str, rootfs: PathBuf, status: String, stderr: String },
    /// The cache directory (or one of its parts) cannot be created or written.
    #[error("rootfs image cache {dir} is not writable: {source}")]
    CacheNotWritable { dir: PathBuf, source: std::io::Error },
    /// Another file operation in the cache failed.
    #[error("rootfs image cache: {what} {path}: {source}")]
    Cache { what: &'static str, path: PathBuf, source: std::io::Error },
    /// The container's reference to the image could not be made.
    #[error(
        "linking rootfs image {image} to {link}: {source} (the link must be on the cache's file \
         system, in a directory that exists)"
    )]
    Link { image: PathBuf, link: PathBuf, source: std::io::Error },
}

/// The module's result type.
pub type Result<T> = std::result::Result<T, Error>;
