/*
 * What Node's fs module does not offer and a sparse block store needs:
 * the data extents of a file (lseek SEEK_DATA / SEEK_HOLE) and punching a
 * hole (fallocate PUNCH_HOLE). Each call runs on libuv's thread pool and
 * answers with a promise, like fs.promises.
 *
 *   dataExtents(fd, start, end) -> Promise<number[]>  [s0, e0, s1, e1, ...]
 *   punchHole(fd, offset, length) -> Promise<void>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
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

static napi_value init (napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "dataExtents", NULL, data_extents, NULL, NULL, NULL, napi_default, NULL },
    { "punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL }
  };
  napi_define_properties(env, exports, 2, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
