//! A ConfigMap volume as the kubelet lays it out, for tests of the functions directory.

use std::path::Path;

/// The ConfigMap volume layout: every file is a symlink into `..data`, which is itself a symlink
/// to a timestamped directory, swapped atomically on update.
pub struct ConfigMapVolume<'a> {
    root: &'a Path,
    version: u32,
}

impl<'a> ConfigMapVolume<'a> {
    pub fn new(root: &'a Path, files: &[(impl AsRef<str>, Vec<u8>)]) -> Self {
        let mut volume = ConfigMapVolume { root, version: 0 };
        volume.update(files);
        for (name, _) in files {
            let name = name.as_ref();
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        volume
    }

    /// What the kubelet does: write a new directory, then swap `..data` to it in one rename.
    pub fn update(&mut self, files: &[(impl AsRef<str>, Vec<u8>)]) {
        self.version += 1;
        let dir = format!("..2026_11_22_{}", self.version);
        std::fs::create_dir(self.root.join(&dir)).unwrap();
        for (name, bytes) in files {
            std::fs::write(self.root.join(&dir).join(name.as_ref()), bytes).unwrap();
        }
        std::os::unix::fs::symlink(&dir, self.root.join("..data_tmp")).unwrap();
        std::fs::rename(self.root.join("..data_tmp"), self.root.join("..data")).unwrap();
    }
}
