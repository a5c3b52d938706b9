{
  "targets": [
    {
      "target_name": "ukai_fs",
      "sources": ["native/ukai-fs.c"],
      "cflags": ["-Wall", "-Wextra", "-O2"]
    }
  ]
}
