{
  "variables": {
    # The native FUSE engine needs libfuse 3's headers (Debian: libfuse3-dev);
    # without them only the file addon is built and mounts use fuse-native.
    "with_fuse3": "<!(pkg-config --exists fuse3 2>/dev/null && echo 1 || echo 0)"
  },
  "targets": [
    {
      "target_name": "ukai_fs",
      "sources": ["native/ukai-fs.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ],
  "conditions": [
    ["with_fuse3==1", {
      "targets": [
        {
          "target_name": "ukai_fuse",
          "sources": ["native/ukai-fuse.c"],
          "cflags": ["-Wall", "-Wextra", "-O2", "<!@(pkg-config --cflags fuse3)"],
          "libraries": ["<!@(pkg-config --libs fuse3)"]
        }
      ]
    }]
  ]
}
