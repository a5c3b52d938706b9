/*
 * What Node's fs module does not offer and a sparse block store needs:
 * the data extents of a file (lseek SEEK_DATA / SEEK_HOLE) and punching a
 * hole (fallocate PUNCH_HOLE). Each call runs on libuv's thread pool and
 * answers with a promise, like fs.promises.
 *
 *   dataExtents(fd, start, end) -> Promise<number[]>  [s0, e0, s1, e1, ...]
 *   punchHole(fd, offset, length) -> Promise<void>
 *
 * And many positional reads or writes in one trip to the thread pool, so
 * that the requests of one event-loop turn cost one hand-off and one
 * completion, not one each:
 *
 *   readMany(fds, positions, buffers) -> Promise<Int32Array>
 *   writeMany(fds, positions, buffers) -> Promise<Int32Array>
 *
 * Entry i reads buffers[i].length bytes of fds[i] at positions[i] (up to
 * the file's end) or writes all of buffers[i] there; its result is the
 * number of bytes done, or -errno. fds is an Int32Array, positions a
 * Float64Array; the buffers stay referenced until the promise settles.
 *
 * And one read at once on the calling thread, when the page cache can
 * answer it without waiting (preadv2 with RWF_NOWAIT): no hand-off to the
 * thread pool at all.
 *
 *   readNow(fd, buffer, position) -> number
 *
 * The result is the bytes read (up to the file's end), or -EAGAIN when
 * the read would have waited (for the disk, a locked page): nothing of
 * it counts then, and the caller reads it on the pool. Any other -errno
 * is the read's error (-EOPNOTSUPP: not on this kernel or file system).
 * Writes have no such call: ext4 refuses RWF_NOWAIT on buffered writes
 * (EOPNOTSUPP, Linux 6.18).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>
#include <linux/falloc.h>
#include <node_api.h>

enum op { OP_EXTENTS, OP_PUNCH };

struct job {
  napi_async_work work;
  napi_deferred deferred;
  enum op op;
  int fd;
  int64_t a, b;
  int err;
  const char *syscall;
  int64_t *extents;
  size_t count, cap;
};

static int push (struct job *j, int64_t s, int64_t e) {
  if (j->count + 2 > j->cap) {
    size_t cap = j->cap == 0 ? 16 : j->cap * 2;
    int64_t *n = realloc(j->extents, cap * sizeof *n);
    if (n == NULL) return -1;
    j->extents = n;
    j->cap = cap;
  }
  j->extents[j->count++] = s;
  j->extents[j->count++] = e;
  return 0;
}

static void execute (napi_env env, void *data) {
  (void)env;
  struct job *j = data;
  if (j->op == OP_PUNCH) {
    if (j->b > 0 && fallocate(j->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, j->a, j->b) != 0) {
      j->err = errno;
      j->syscall = "fallocate";
    }
    return;
  }
  int64_t pos = j->a;
  while (pos < j->b) {
    off_t s = lseek(j->fd, pos, SEEK_DATA);
    if (s < 0) {
      if (errno != ENXIO) { j->err = errno; j->syscall = "lseek"; }
      return; /* ENXIO: no data at or past pos */
    }
    if (s >= j->b) return;
    off_t e = lseek(j->fd, s, SEEK_HOLE);
    if (e < 0) { j->err = errno; j->syscall = "lseek"; return; }
    if (e > j->b) e = j->b;
    if (push(j, s, e) != 0) { j->err = ENOMEM; j->syscall = "realloc"; return; }
    pos = e;
  }
}

static void complete (napi_env env, napi_status status, void *data) {
  struct job *j = data;
  napi_value result;
  if (status != napi_ok || j->err != 0) {
    int err = j->err != 0 ? j->err : EIO;
    napi_value msg, code, error, num, sys;
    char text[160];
    snprintf(text, sizeof text, "%s: %s", j->syscall != NULL ? j->syscall : "ukai-fs", strerror(err));
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &error);
    napi_create_int32(env, -err, &num);
    napi_set_named_property(env, error, "errno", num);
    const char *name = err == EOPNOTSUPP ? "EOPNOTSUPP" : err == EBADF ? "EBADF" : err == EINVAL ? "EINVAL" : err == ENOSPC ? "ENOSPC" : "EIO";
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
    napi_set_named_property(env, error, "code", code);
    napi_create_string_utf8(env, j->syscall != NULL ? j->syscall : "", NAPI_AUTO_LENGTH, &sys);
    napi_set_named_property(env, error, "syscall", sys);
    napi_reject_deferred(env, j->deferred, error);
  } else if (j->op == OP_PUNCH) {
    napi_get_undefined(env, &result);
    napi_resolve_deferred(env, j->deferred, result);
  } else {
    napi_create_array_with_length(env, j->count, &result);
    for (size_t i = 0; i < j->count; i++) {
      napi_value v;
      napi_create_int64(env, j->extents[i], &v);
      napi_set_element(env, result, (uint32_t)i, v);
    }
    napi_resolve_deferred(env, j->deferred, result);
  }
  napi_delete_async_work(env, j->work);
  free(j->extents);
  free(j);
}

static napi_value start (napi_env env, napi_callback_info info, enum op op) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  int64_t a, b;
  if (argc != 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &a) != napi_ok || napi_get_value_int64(env, argv[2], &b) != napi_ok ||
      fd < 0 || a < 0 || b < 0) {
    napi_throw_type_error(env, "EINVAL", "expected (fd, offset, length-or-end) as non-negative integers");
    return NULL;
  }
  struct job *j = calloc(1, sizeof *j);
  if (j == NULL) { napi_throw_error(env, "ENOMEM", "out of memory"); return NULL; }
  j->op = op;
  j->fd = fd;
  j->a = a;
  j->b = b;
  napi_value promise, name;
  napi_create_promise(env, &j->deferred, &promise);
  napi_create_string_utf8(env, op == OP_PUNCH ? "ukai-fs:punch" : "ukai-fs:extents", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, j, &j->work);
  napi_queue_async_work(env, j->work);
  return promise;
}

static napi_value data_extents (napi_env env, napi_callback_info info) { return start(env, info, OP_EXTENTS); }
static napi_value punch_hole (napi_env env, napi_callback_info info) { return start(env, info, OP_PUNCH); }

/* ---- many reads or writes per thread-pool trip ---- */

struct io_entry {
  int fd;
  char *buf;
  size_t len;
  int64_t pos;
  int32_t result;
};

struct io_job {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep;
  int writing;
  size_t count;
  struct io_entry entries[];
};

static void io_execute (napi_env env, void *data) {
  (void)env;
  struct io_job *j = data;
  for (size_t i = 0; i < j->count; i++) {
    struct io_entry *e = &j->entries[i];
    size_t done = 0;
    int err = 0;
    while (done < e->len) {
      ssize_t n = j->writing
        ? pwrite(e->fd, e->buf + done, e->len - done, (off_t)(e->pos + (int64_t)done))
        : pread(e->fd, e->buf + done, e->len - done, (off_t)(e->pos + (int64_t)done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { err = errno; break; }
      /* A read stops at the file's end; a write that takes nothing is an error. */
      if (n == 0) { if (j->writing) err = EIO; break; }
      done += (size_t)n;
    }
    e->result = err != 0 ? -err : (int32_t)done;
  }
}

static void io_complete (napi_env env, napi_status status, void *data) {
  struct io_job *j = data;
  napi_value ab, arr;
  void *out;
  if (status == napi_ok && napi_create_arraybuffer(env, j->count * sizeof(int32_t), &out, &ab) == napi_ok &&
      napi_create_typedarray(env, napi_int32_array, j->count, ab, 0, &arr) == napi_ok) {
    int32_t *r = out;
    for (size_t i = 0; i < j->count; i++) r[i] = j->entries[i].result;
    napi_resolve_deferred(env, j->deferred, arr);
  } else {
    napi_value msg, error;
    napi_create_string_utf8(env, "ukai-fs: the batch was not run", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &error);
    napi_reject_deferred(env, j->deferred, error);
  }
  napi_delete_reference(env, j->keep);
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value io_start (napi_env env, napi_callback_info info, int writing) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_typedarray_type ft, pt;
  size_t nf, np;
  void *fdata, *pdata;
  uint32_t nb;
  bool isArray = false;
  if (argc != 3 ||
      napi_get_typedarray_info(env, argv[0], &ft, &nf, &fdata, NULL, NULL) != napi_ok || ft != napi_int32_array ||
      napi_get_typedarray_info(env, argv[1], &pt, &np, &pdata, NULL, NULL) != napi_ok || pt != napi_float64_array ||
      napi_is_array(env, argv[2], &isArray) != napi_ok || !isArray ||
      napi_get_array_length(env, argv[2], &nb) != napi_ok || nf != np || nf != nb || nf == 0) {
    napi_throw_type_error(env, "EINVAL", "expected (fds: Int32Array, positions: Float64Array, buffers: Buffer[]) of one non-zero length");
    return NULL;
  }
  struct io_job *j = calloc(1, sizeof *j + nf * sizeof(struct io_entry));
  if (j == NULL) { napi_throw_error(env, "ENOMEM", "out of memory"); return NULL; }
  j->writing = writing;
  j->count = nf;
  const int32_t *fds = fdata;
  const double *positions = pdata;
  for (uint32_t i = 0; i < nb; i++) {
    napi_value b;
    void *p;
    size_t len;
    bool isBuffer = false;
    double pos = positions[i];
    if (napi_get_element(env, argv[2], i, &b) != napi_ok || napi_is_buffer(env, b, &isBuffer) != napi_ok || !isBuffer ||
        napi_get_buffer_info(env, b, &p, &len) != napi_ok || fds[i] < 0 || !(pos >= 0 && pos <= 9007199254740991.0) ||
        len > INT32_MAX) {
      free(j);
      napi_throw_type_error(env, "EINVAL", "each entry needs an fd >= 0, a position >= 0 and a Buffer under 2 GiB");
      return NULL;
    }
    j->entries[i] = (struct io_entry){ .fd = fds[i], .buf = p, .len = len, .pos = (int64_t)pos };
  }
  napi_value promise, name;
  napi_create_reference(env, argv[2], 1, &j->keep);
  napi_create_promise(env, &j->deferred, &promise);
  napi_create_string_utf8(env, writing ? "ukai-fs:writeMany" : "ukai-fs:readMany", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, io_execute, io_complete, j, &j->work);
  napi_queue_async_work(env, j->work);
  return promise;
}

static napi_value read_now (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  int32_t fd;
  double pos;
  void *p;
  size_t len;
  bool isBuffer = false;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 ||
      napi_is_buffer(env, argv[1], &isBuffer) != napi_ok || !isBuffer ||
      napi_get_buffer_info(env, argv[1], &p, &len) != napi_ok || len > INT32_MAX ||
      napi_get_value_double(env, argv[2], &pos) != napi_ok || !(pos >= 0 && pos <= 9007199254740991.0)) {
    napi_throw_type_error(env, "EINVAL", "expected (fd >= 0, buffer: Buffer under 2 GiB, position >= 0)");
    return NULL;
  }
  size_t done = 0;
  int err = 0;
  while (done < len) {
    struct iovec v = { .iov_base = (char *)p + done, .iov_len = len - done };
    ssize_t n = preadv2(fd, &v, 1, (off_t)((int64_t)pos + (int64_t)done), RWF_NOWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) { err = errno == EWOULDBLOCK ? EAGAIN : errno; break; }
    if (n == 0) break; /* the file's end */
    done += (size_t)n;
  }
  napi_create_int32(env, err != 0 ? -err : (int32_t)done, &out);
  return out;
}

static napi_value read_many (napi_env env, napi_callback_info info) { return io_start(env, info, 0); }
static napi_value write_many (napi_env env, napi_callback_info info) { return io_start(env, info, 1); }

static napi_value init (napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "dataExtents", NULL, data_extents, NULL, NULL, NULL, napi_default, NULL },
    { "punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL },
    { "readMany", NULL, read_many, NULL, NULL, NULL, napi_default, NULL },
    { "writeMany", NULL, write_many, NULL, NULL, NULL, napi_default, NULL },
    { "readNow", NULL, read_now, NULL, NULL, NULL, napi_default, NULL }
  };
  napi_define_properties(env, exports, 5, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
