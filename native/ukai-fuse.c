/*
 * The native FUSE data plane: libfuse 3's multi-threaded loop on threads
 * of its own, reading the blocks the TypeScript side lets it read
 * straight from their block files, and handing everything else to
 * TypeScript (a threadsafe function) while the libfuse thread waits.
 *
 *   mount(mountpoint, options, handler) -> undefined     (throws on failure)
 *   unmount() -> Promise<void>
 *   reply(id, result, payload?) -> boolean
 *   registerImage(dir, prefix, width, suffix, blockSize, blockCount, usedSize) -> slot
 *   unregisterImage(slot) -> Promise<Float64Array>       (the counters left, as takeCounters)
 *   grant(slot, ranges) / revoke(slot, ranges)           (ranges: Float64Array [s0, e0, ...])
 *   drain(slot, ranges) -> Promise<void>
 *   setUsedSize(slot, usedSize)
 *   takeCounters(slot) -> Float64Array [reads, bytes, pieces, seconds]
 *   heartbeat(ms)                                        (the JS thread runs: the fast path serves for ms more)
 *   fastBlocks(slot) -> Float64Array of readable ranges (tests)
 *   readFast(slot, offset, buffer) / readFastAsync(...) / setReadDelay(slot, us)   (tests)
 *
 * The rule that keeps the fast path safe (a read never returns data the
 * TypeScript side no longer stands behind): a read takes the image's
 * mutex, checks that every block it touches is granted, and raises each
 * block's in-flight count before it lets go; revoke() clears the grants
 * under the same mutex, synchronously on the JS thread, so once it
 * returns no new native read of those blocks starts; drain() then waits
 * (off the JS thread) until the in-flight counts of those blocks are
 * zero. The TypeScript side clears a grant in the same tick as the state
 * change that makes the local copy unreadable, and waits for the drain
 * before that change counts (a write acknowledged, a refresh answered, a
 * removal stored).
 *
 * The block files are opened here, read-only, by path (never the block
 * store's handles, which its LRU may close and the kernel reuse); a
 * missing file, an error, a read that is not wholly within used_size or
 * touches a block not granted goes to TypeScript, which has the rules
 * for all of them.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <node_api.h>

/* Operations handed to TypeScript; the numbers are shared with native-engine.ts. */
enum op { OP_GETATTR = 1, OP_READDIR, OP_OPEN, OP_RELEASE, OP_READ, OP_WRITE, OP_FLUSH, OP_FSYNC, OP_TRUNCATE, OP_STATFS };

#define MAX_SLOTS 4096
/* Block files one image keeps open at most (beyond it, idle ones are closed). */
#define MAX_OPEN_PER_IMAGE 512
#define MAX_PENDING 1024
#define MAX_THREADS 32
#define MAX_IO (1024 * 1024)

/* ---- images and their fast-path grants ---- */

struct block {
  int fd;            /* -1: not open here */
  uint32_t inflight; /* native reads of it under way */
  bool fast;         /* granted: the local copy may be read here */
};

struct image {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool used;         /* the slot is taken */
  bool live;         /* registered: reads may be served */
  char dir[PATH_MAX];
  char prefix[64], suffix[64];
  int width;
  uint64_t block_size;
  uint64_t nblocks;
  struct block *blocks;
  int open_fds;
  uint64_t clock;    /* where the next eviction scan starts */
  _Atomic uint64_t used_size;
  _Atomic uint64_t reads, bytes, pieces, nanos;
  _Atomic uint32_t delay_us; /* tests: each read waits this long with its blocks taken */
};

static struct image images[MAX_SLOTS];
/*
 * Until when (CLOCK_MONOTONIC ns) the JS thread is known to be running:
 * it renews this (heartbeat) several times within it. A JS thread that
 * stalls cannot apply a revocation, so the fast path stops with it and
 * reads wait for JS, as on the fuse-native engine. 0: no deadline.
 */
static _Atomic uint64_t fresh_until;
static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t images_once = PTHREAD_ONCE_INIT;

static void images_init (void) {
  for (int i = 0; i < MAX_SLOTS; i++) {
    pthread_mutex_init(&images[i].mu, NULL);
    pthread_cond_init(&images[i].cv, NULL);
  }
}

static uint64_t now_ns (void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Closes one idle block file of the image (mutex held). */
static void evict_one (struct image *img) {
  for (uint64_t n = 0; n < img->nblocks; n++) {
    uint64_t b = (img->clock + n) % img->nblocks;
    struct block *k = &img->blocks[b];
    if (k->fd >= 0 && k->inflight == 0) {
      close(k->fd);
      k->fd = -1;
      img->open_fds--;
      img->clock = b + 1;
      return;
    }
  }
}

/*
 * The fast path. Returns the bytes read (the whole request), or -1 when
 * the request goes to TypeScript.
 */
static ssize_t fast_read (uint64_t fh, char *buf, size_t size, off_t off) {
  uint32_t slot = (uint32_t)(fh >> 32);
  if (slot == 0 || slot >= MAX_SLOTS || off < 0) return -1;
  uint64_t deadline = atomic_load(&fresh_until);
  if (deadline != 0 && now_ns() > deadline) return -1;
  struct image *img = &images[slot];
  uint64_t start = (uint64_t)off, end = start + size;
  if (size == 0) return -1;
  pthread_mutex_lock(&img->mu);
  if (!img->live || end > atomic_load(&img->used_size)) { pthread_mutex_unlock(&img->mu); return -1; }
  uint64_t bs = img->block_size;
  uint64_t first = start / bs, last = (end - 1) / bs;
  if (last >= img->nblocks) { pthread_mutex_unlock(&img->mu); return -1; }
  for (uint64_t b = first; b <= last; b++) {
    struct block *k = &img->blocks[b];
    if (!k->fast) { pthread_mutex_unlock(&img->mu); return -1; }
    if (k->fd < 0) {
      char path[PATH_MAX + 160];
      snprintf(path, sizeof path, "%s/%s%0*llu%s", img->dir, img->prefix, img->width, (unsigned long long)b, img->suffix);
      if (img->open_fds >= MAX_OPEN_PER_IMAGE) evict_one(img);
      int fd = open(path, O_RDONLY | O_CLOEXEC);
      /* A missing file (a hole, or a lost directory) is TypeScript's to answer. */
      if (fd < 0) { pthread_mutex_unlock(&img->mu); return -1; }
      k->fd = fd;
      img->open_fds++;
    }
  }
  for (uint64_t b = first; b <= last; b++) img->blocks[b].inflight++;
  pthread_mutex_unlock(&img->mu);

  uint32_t delay = atomic_load(&img->delay_us);
  if (delay > 0) usleep(delay);
  uint64_t t0 = now_ns();
  bool ok = true;
  uint64_t at = start;
  while (at < end && ok) {
    uint64_t b = at / bs;
    uint64_t in = at - b * bs;
    uint64_t len = bs - in < end - at ? bs - in : end - at;
    /* The fd stays open while inflight > 0: eviction and drain skip it. */
    int fd = img->blocks[b].fd;
    uint64_t done = 0;
    while (done < len) {
      ssize_t n = pread(fd, buf + (at - start) + done, len - done, (off_t)(in + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) { ok = false; break; }
      if (n == 0) { memset(buf + (at - start) + done, 0, len - done); done = len; break; } /* past the file's end: zeros */
      done += (uint64_t)n;
    }
    at += len;
  }
  uint64_t t1 = now_ns();

  /* Counted before the blocks are let go: a drain (an unregistration) that returns has them. */
  if (ok) {
    atomic_fetch_add(&img->reads, 1);
    atomic_fetch_add(&img->bytes, size);
    atomic_fetch_add(&img->pieces, last - first + 1);
    atomic_fetch_add(&img->nanos, t1 - t0);
  }
  pthread_mutex_lock(&img->mu);
  bool wake = false;
  for (uint64_t b = first; b <= last; b++) if (--img->blocks[b].inflight == 0) wake = true;
  if (wake) pthread_cond_broadcast(&img->cv);
  pthread_mutex_unlock(&img->mu);
  return ok ? (ssize_t)size : -1;
}

/* ---- requests handed to TypeScript ---- */

struct request {
  uint32_t id;
  enum op op;
  const char *path;
  int64_t fd;        /* the TypeScript side's file number, -1 without */
  int64_t a, b;      /* op arguments: flags, size/offset, datasync */
  const char *wdata; /* a write's data, valid while the libfuse thread waits */
  size_t wlen;
  char *rbuf;        /* a read's destination */
  size_t rcap;
  bool done;
  int result;
  uint32_t slot;     /* open: the image slot of the file */
  struct stat st;
  struct statvfs sv;
  char **names;
  uint32_t nnames;
  pthread_cond_t cv;
};

static pthread_mutex_t req_mu = PTHREAD_MUTEX_INITIALIZER;
static struct request *pending[MAX_PENDING];
static uint32_t next_seq = 1;

static struct {
  struct fuse *fuse;
  pthread_t thread;
  bool running;
  _Atomic bool exiting;
  napi_threadsafe_function tsfn;
  char mountpoint[PATH_MAX];
  int loop_result;
  _Atomic bool ended;
} plane;

/* Hands `r` to TypeScript and waits for its reply; returns r->result. */
static int ask (struct request *r) {
  if (atomic_load(&plane.exiting)) return -EIO;
  pthread_cond_init(&r->cv, NULL);
  pthread_mutex_lock(&req_mu);
  uint32_t idx = MAX_PENDING;
  for (;;) {
    for (uint32_t i = 0; i < MAX_PENDING; i++) if (pending[i] == NULL) { idx = i; break; }
    if (idx < MAX_PENDING) break;
    /* More requests than the table holds waiting at once: wait for a reply. */
    pthread_mutex_unlock(&req_mu);
    usleep(1000);
    pthread_mutex_lock(&req_mu);
  }
  r->id = idx + MAX_PENDING * (next_seq++ % 1000000);
  pending[idx] = r;
  pthread_mutex_unlock(&req_mu);
  if (napi_call_threadsafe_function(plane.tsfn, r, napi_tsfn_nonblocking) != napi_ok) {
    pthread_mutex_lock(&req_mu);
    pending[idx] = NULL;
    pthread_mutex_unlock(&req_mu);
    pthread_cond_destroy(&r->cv);
    return -EIO;
  }
  pthread_mutex_lock(&req_mu);
  while (!r->done) pthread_cond_wait(&r->cv, &req_mu);
  pthread_mutex_unlock(&req_mu);
  pthread_cond_destroy(&r->cv);
  return r->result;
}

static int64_t fd_of (struct fuse_file_info *fi) {
  return fi == NULL ? -1 : (int64_t)(fi->fh & 0xffffffffu);
}

static int u_getattr (const char *path, struct stat *st, struct fuse_file_info *fi) {
  (void)fi;
  /* unmount's wake-up lookup is answered here (the loop is ending). */
  if (atomic_load(&plane.exiting)) return -ENOENT;
  struct request r = { .op = OP_GETATTR, .path = path, .fd = -1 };
  int res = ask(&r);
  if (res == 0) *st = r.st;
  return res;
}

static int u_readdir (const char *path, void *buf, fuse_fill_dir_t filler, off_t off, struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
  (void)off; (void)fi; (void)flags;
  struct request r = { .op = OP_READDIR, .path = path, .fd = -1 };
  int res = ask(&r);
  if (res == 0) {
    filler(buf, ".", NULL, 0, 0);
    filler(buf, "..", NULL, 0, 0);
    for (uint32_t i = 0; i < r.nnames; i++) filler(buf, r.names[i], NULL, 0, 0);
  }
  for (uint32_t i = 0; i < r.nnames; i++) free(r.names[i]);
  free(r.names);
  return res;
}

static int u_open (const char *path, struct fuse_file_info *fi) {
  struct request r = { .op = OP_OPEN, .path = path, .fd = -1, .a = fi->flags };
  int res = ask(&r);
  if (res < 0) return res;
  fi->fh = ((uint64_t)r.slot << 32) | (uint32_t)res;
  return 0;
}

static int u_release (const char *path, struct fuse_file_info *fi) {
  struct request r = { .op = OP_RELEASE, .path = path, .fd = fd_of(fi) };
  return ask(&r);
}

static int u_read (const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  ssize_t n = fast_read(fi->fh, buf, size, off);
  if (n >= 0) return (int)n;
  struct request r = { .op = OP_READ, .path = path, .fd = fd_of(fi), .a = (int64_t)size, .b = (int64_t)off, .rbuf = buf, .rcap = size };
  return ask(&r);
}

static int u_write (const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
  struct request r = { .op = OP_WRITE, .path = path, .fd = fd_of(fi), .a = (int64_t)size, .b = (int64_t)off, .wdata = buf, .wlen = size };
  return ask(&r);
}

static int u_flush (const char *path, struct fuse_file_info *fi) {
  struct request r = { .op = OP_FLUSH, .path = path, .fd = fd_of(fi) };
  return ask(&r);
}

static int u_fsync (const char *path, int datasync, struct fuse_file_info *fi) {
  struct request r = { .op = OP_FSYNC, .path = path, .fd = fd_of(fi), .a = datasync };
  return ask(&r);
}

static int u_truncate (const char *path, off_t size, struct fuse_file_info *fi) {
  struct request r = { .op = OP_TRUNCATE, .path = path, .fd = fd_of(fi), .a = (int64_t)size };
  return ask(&r);
}

static int u_statfs (const char *path, struct statvfs *sv) {
  struct request r = { .op = OP_STATFS, .path = path, .fd = -1 };
  int res = ask(&r);
  if (res == 0) *sv = r.sv;
  return res;
}

static int u_utimens (const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
  (void)path; (void)tv; (void)fi;
  return 0;
}

/* What would make the mount a general file system: refused (EPERM), as the fuse-native engine does. */
static int u_refuse2 (const char *a, const char *b) { (void)a; (void)b; return -EPERM; }
static int u_refuse_rename (const char *a, const char *b, unsigned int flags) { (void)a; (void)b; (void)flags; return -EPERM; }
static int u_refuse_mode (const char *a, mode_t m) { (void)a; (void)m; return -EPERM; }
static int u_refuse_path (const char *a) { (void)a; return -EPERM; }
static int u_refuse_mknod (const char *a, mode_t m, dev_t d) { (void)a; (void)m; (void)d; return -EPERM; }
static int u_refuse_create (const char *a, mode_t m, struct fuse_file_info *fi) { (void)a; (void)m; (void)fi; return -EPERM; }
static int u_refuse_chmod (const char *a, mode_t m, struct fuse_file_info *fi) { (void)a; (void)m; (void)fi; return -EPERM; }
static int u_refuse_chown (const char *a, uid_t u, gid_t g, struct fuse_file_info *fi) { (void)a; (void)u; (void)g; (void)fi; return -EPERM; }

static void *u_init (struct fuse_conn_info *conn, struct fuse_config *cfg) {
  /* Names of images created or destroyed while mounted are never stale. */
  cfg->entry_timeout = 0;
  cfg->negative_timeout = 0;
  cfg->attr_timeout = 1;
  /* Requests of up to 1 MiB (libfuse 3 asks the kernel for max_pages to match). */
  conn->max_write = MAX_IO;
  conn->max_read = MAX_IO; /* must match the max_read mount option */
  return NULL;
}

static const struct fuse_operations ops = {
  .getattr = u_getattr,
  .readdir = u_readdir,
  .open = u_open,
  .release = u_release,
  .read = u_read,
  .write = u_write,
  .flush = u_flush,
  .fsync = u_fsync,
  .truncate = u_truncate,
  .statfs = u_statfs,
  .utimens = u_utimens,
  .init = u_init,
  .create = u_refuse_create,
  .mkdir = u_refuse_mode,
  .unlink = u_refuse_path,
  .rmdir = u_refuse_path,
  .rename = u_refuse_rename,
  .symlink = u_refuse2,
  .link = u_refuse2,
  .mknod = u_refuse_mknod,
  .chmod = u_refuse_chmod,
  .chown = u_refuse_chown
};

/* ---- the JS side of requests ---- */

static void call_js (napi_env env, napi_value js_cb, void *context, void *data) {
  (void)context;
  struct request *r = data;
  if (env == NULL) return;
  napi_value argv[7], undef;
  napi_get_undefined(env, &undef);
  napi_create_uint32(env, (uint32_t)r->op, &argv[0]);
  napi_create_uint32(env, r->id, &argv[1]);
  napi_create_string_utf8(env, r->path != NULL ? r->path : "", NAPI_AUTO_LENGTH, &argv[2]);
  napi_create_int64(env, r->fd, &argv[3]);
  napi_create_int64(env, r->a, &argv[4]);
  napi_create_int64(env, r->b, &argv[5]);
  if (r->op == OP_WRITE) {
    void *copy;
    /* A copy: the libfuse buffer is gone once we answer, and a replica's socket may hold the data longer. */
    napi_create_buffer_copy(env, r->wlen, r->wdata, &copy, &argv[6]);
  } else {
    argv[6] = undef;
  }
  napi_value ignored;
  if (napi_call_function(env, undef, js_cb, 7, argv, &ignored) != napi_ok) {
    /* The handler threw: answer EIO rather than leave the libfuse thread waiting. */
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    pthread_mutex_lock(&req_mu);
    uint32_t idx = r->id % MAX_PENDING;
    if (pending[idx] == r && !r->done) {
      pending[idx] = NULL;
      r->result = -EIO;
      r->done = true;
      pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&req_mu);
  }
}

static bool get_f64s (napi_env env, napi_value v, double **data, size_t *n) {
  napi_typedarray_type t;
  void *p;
  if (napi_get_typedarray_info(env, v, &t, n, &p, NULL, NULL) != napi_ok || t != napi_float64_array) return false;
  *data = p;
  return true;
}

/* reply(id, result, payload?): true when the request was waiting. */
static napi_value js_reply (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t id;
  int32_t result;
  if (argc < 2 || napi_get_value_uint32(env, argv[0], &id) != napi_ok || napi_get_value_int32(env, argv[1], &result) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "reply(id, result, payload?)");
    return NULL;
  }
  pthread_mutex_lock(&req_mu);
  struct request *r = pending[id % MAX_PENDING];
  if (r == NULL || r->id != id || r->done) {
    pthread_mutex_unlock(&req_mu);
    napi_get_boolean(env, false, &out);
    return out;
  }
  napi_valuetype pt = napi_undefined;
  if (argc >= 3) napi_typeof(env, argv[2], &pt);
  if (result >= 0 && pt != napi_undefined) {
    double *d;
    size_t n;
    if (r->op == OP_GETATTR && get_f64s(env, argv[2], &d, &n) && n >= 10) {
      memset(&r->st, 0, sizeof r->st);
      r->st.st_mode = (mode_t)d[0];
      r->st.st_size = (off_t)d[1];
      r->st.st_nlink = (nlink_t)d[2];
      r->st.st_uid = (uid_t)d[3];
      r->st.st_gid = (gid_t)d[4];
      r->st.st_blksize = (blksize_t)d[5];
      r->st.st_blocks = (blkcnt_t)d[6];
      r->st.st_mtim.tv_sec = (time_t)(d[7] / 1000);
      r->st.st_atim.tv_sec = (time_t)(d[8] / 1000);
      r->st.st_ctim.tv_sec = (time_t)(d[9] / 1000);
    } else if (r->op == OP_STATFS && get_f64s(env, argv[2], &d, &n) && n >= 9) {
      memset(&r->sv, 0, sizeof r->sv);
      r->sv.f_bsize = (unsigned long)d[0];
      r->sv.f_frsize = (unsigned long)d[1];
      r->sv.f_blocks = (fsblkcnt_t)d[2];
      r->sv.f_bfree = (fsblkcnt_t)d[3];
      r->sv.f_bavail = (fsblkcnt_t)d[4];
      r->sv.f_files = (fsfilcnt_t)d[5];
      r->sv.f_ffree = (fsfilcnt_t)d[6];
      r->sv.f_favail = (fsfilcnt_t)d[7];
      r->sv.f_namemax = (unsigned long)d[8];
    } else if (r->op == OP_OPEN) {
      uint32_t slot = 0;
      napi_get_value_uint32(env, argv[2], &slot);
      r->slot = slot < MAX_SLOTS ? slot : 0;
    } else if (r->op == OP_READ) {
      void *p;
      size_t len;
      bool isBuf = false;
      if (napi_is_buffer(env, argv[2], &isBuf) == napi_ok && isBuf && napi_get_buffer_info(env, argv[2], &p, &len) == napi_ok) {
        size_t n2 = (size_t)result;
        if (n2 > len) n2 = len;
        if (n2 > r->rcap) n2 = r->rcap;
        memcpy(r->rbuf, p, n2);
        result = (int32_t)n2;
      } else {
        result = -EIO;
      }
    } else if (r->op == OP_READDIR) {
      bool isArr = false;
      uint32_t n3 = 0;
      if (napi_is_array(env, argv[2], &isArr) == napi_ok && isArr && napi_get_array_length(env, argv[2], &n3) == napi_ok) {
        r->names = calloc(n3 == 0 ? 1 : n3, sizeof *r->names);
        for (uint32_t i = 0; r->names != NULL && i < n3; i++) {
          napi_value s;
          char name[256];
          size_t len = 0;
          if (napi_get_element(env, argv[2], i, &s) != napi_ok || napi_get_value_string_utf8(env, s, name, sizeof name, &len) != napi_ok) continue;
          r->names[r->nnames++] = strdup(name);
        }
      }
    }
  } else if (result >= 0 && (r->op == OP_READ || r->op == OP_GETATTR || r->op == OP_STATFS)) {
    result = -EIO; /* an answer without its data */
  }
  pending[id % MAX_PENDING] = NULL;
  r->result = result;
  r->done = true;
  pthread_cond_signal(&r->cv);
  pthread_mutex_unlock(&req_mu);
  napi_get_boolean(env, true, &out);
  return out;
}

/* ---- mount and unmount ---- */

static void *loop_thread (void *arg) {
  (void)arg;
  struct fuse_loop_config *cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(cfg, MAX_THREADS);
  fuse_loop_cfg_set_clone_fd(cfg, 0);
  plane.loop_result = fuse_loop_mt(plane.fuse, cfg);
  fuse_loop_cfg_destroy(cfg);
  fuse_unmount(plane.fuse);
  fuse_destroy(plane.fuse);
  plane.fuse = NULL;
  atomic_store(&plane.ended, true);
  return NULL;
}

static bool get_string (napi_env env, napi_value v, char *out, size_t cap) {
  size_t len;
  return napi_get_value_string_utf8(env, v, out, cap, &len) == napi_ok && len < cap - 1;
}

/* mount(mountpoint, options, handler): options is the -o list ("fsname=ukai,..."). */
static napi_value js_mount (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char opts[2048];
  if (argc != 3 || !get_string(env, argv[0], plane.mountpoint, sizeof plane.mountpoint) || !get_string(env, argv[1], opts, sizeof opts)) {
    napi_throw_type_error(env, "EINVAL", "mount(mountpoint, options, handler)");
    return NULL;
  }
  if (plane.running) { napi_throw_error(env, "EBUSY", "this process already has a native FUSE mount"); return NULL; }
  napi_value name;
  napi_create_string_utf8(env, "ukai-fuse", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[2], NULL, name, 0, 1, NULL, NULL, NULL, call_js, &plane.tsfn) != napi_ok) {
    napi_throw_error(env, "EIO", "ukai-fuse: cannot create the threadsafe function");
    return NULL;
  }
  /* The mount does not keep the process alive; the server's listeners do. */
  napi_unref_threadsafe_function(env, plane.tsfn);
  char *args_v[] = { "ukai", "-o", opts, NULL };
  struct fuse_args args = FUSE_ARGS_INIT(3, args_v);
  atomic_store(&plane.exiting, false);
  plane.fuse = fuse_new(&args, &ops, sizeof ops, NULL);
  if (plane.fuse == NULL) {
    napi_release_threadsafe_function(plane.tsfn, napi_tsfn_abort);
    napi_throw_error(env, "EINVAL", "ukai-fuse: fuse_new failed (bad mount options?)");
    return NULL;
  }
  if (fuse_mount(plane.fuse, plane.mountpoint) != 0) {
    fuse_destroy(plane.fuse);
    plane.fuse = NULL;
    napi_release_threadsafe_function(plane.tsfn, napi_tsfn_abort);
    char text[PATH_MAX + 64];
    snprintf(text, sizeof text, "ukai-fuse: mounting %s failed", plane.mountpoint);
    napi_throw_error(env, "EIO", text);
    return NULL;
  }
  atomic_store(&plane.ended, false);
  if (pthread_create(&plane.thread, NULL, loop_thread, NULL) != 0) {
    fuse_unmount(plane.fuse);
    fuse_destroy(plane.fuse);
    plane.fuse = NULL;
    napi_release_threadsafe_function(plane.tsfn, napi_tsfn_abort);
    napi_throw_error(env, "EAGAIN", "ukai-fuse: cannot start the FUSE thread");
    return NULL;
  }
  plane.running = true;
  return NULL;
}

struct work {
  napi_async_work work;
  napi_deferred deferred;
  uint32_t slot;
  double *ranges;
  size_t nranges;
  bool unregister;
  double counters[4]; /* unregister: what the image's reads left to take */
};

static void unmount_execute (napi_env env, void *data) {
  (void)env; (void)data;
  atomic_store(&plane.exiting, true);
  fuse_exit(plane.fuse);
  /*
   * The loop's threads wait in read(/dev/fuse): one request wakes one of
   * them, which sees the exit and ends the loop (libfuse cancels the
   * others). A lookup of a name nobody has is always sent (entry and
   * negative timeouts are 0) and answered here, not by JS.
   */
  char path[PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/.ukai-unmount-%ld", plane.mountpoint, (long)getpid());
  for (int tries = 0; !atomic_load(&plane.ended); tries++) {
    struct stat st;
    stat(path, &st);
    for (int i = 0; i < 100 && !atomic_load(&plane.ended); i++) usleep(10000);
    /*
     * Asked again each second: a wake-up may find every thread busy. (A
     * mount detached behind our back while files on it stay open is not
     * reached by the lookup at all; its loop ends when the last of them
     * closes.)
     */
    (void)tries;
  }
  pthread_join(plane.thread, NULL);
}

static void unmount_complete (napi_env env, napi_status status, void *data) {
  (void)status;
  struct work *w = data;
  plane.running = false;
  napi_release_threadsafe_function(plane.tsfn, napi_tsfn_release);
  napi_value undef;
  napi_get_undefined(env, &undef);
  napi_resolve_deferred(env, w->deferred, undef);
  napi_delete_async_work(env, w->work);
  free(w);
}

static napi_value queue (napi_env env, struct work *w, napi_async_execute_callback exec, napi_async_complete_callback done, const char *what) {
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, exec, done, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;
}

static napi_value js_unmount (napi_env env, napi_callback_info info) {
  (void)info;
  struct work *w = calloc(1, sizeof *w);
  if (w == NULL) { napi_throw_error(env, "ENOMEM", "out of memory"); return NULL; }
  if (!plane.running) {
    napi_value promise, undef;
    napi_create_promise(env, &w->deferred, &promise);
    napi_get_undefined(env, &undef);
    napi_resolve_deferred(env, w->deferred, undef);
    free(w);
    return promise;
  }
  return queue(env, w, unmount_execute, unmount_complete, "ukai-fuse:unmount");
}

/* ---- images ---- */

static struct image *image_arg (napi_env env, napi_value v, uint32_t *slot) {
  if (napi_get_value_uint32(env, v, slot) != napi_ok || *slot == 0 || *slot >= MAX_SLOTS || !images[*slot].used) {
    napi_throw_type_error(env, "EINVAL", "not a registered image slot");
    return NULL;
  }
  return &images[*slot];
}

/* registerImage(dir, prefix, width, suffix, blockSize, blockCount, usedSize) -> slot */
static napi_value js_register (napi_env env, napi_callback_info info) {
  pthread_once(&images_once, images_init);
  size_t argc = 7;
  napi_value argv[7];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  char dir[PATH_MAX], prefix[64], suffix[64];
  int32_t width;
  int64_t bs, count, used;
  if (argc != 7 || !get_string(env, argv[0], dir, sizeof dir) || !get_string(env, argv[1], prefix, sizeof prefix) ||
      napi_get_value_int32(env, argv[2], &width) != napi_ok || !get_string(env, argv[3], suffix, sizeof suffix) ||
      napi_get_value_int64(env, argv[4], &bs) != napi_ok || napi_get_value_int64(env, argv[5], &count) != napi_ok ||
      napi_get_value_int64(env, argv[6], &used) != napi_ok || width < 1 || width > 20 || bs <= 0 || count < 0 || count > (1 << 30) || used < 0) {
    napi_throw_type_error(env, "EINVAL", "registerImage(dir, prefix, width, suffix, blockSize, blockCount, usedSize)");
    return NULL;
  }
  pthread_mutex_lock(&slots_mu);
  uint32_t slot = 0;
  for (uint32_t i = 1; i < MAX_SLOTS; i++) if (!images[i].used) { slot = i; break; }
  if (slot == 0) { pthread_mutex_unlock(&slots_mu); napi_throw_error(env, "EMFILE", "too many images registered"); return NULL; }
  struct image *img = &images[slot];
  pthread_mutex_lock(&img->mu);
  img->blocks = calloc(count == 0 ? 1 : (size_t)count, sizeof *img->blocks);
  if (img->blocks == NULL) {
    pthread_mutex_unlock(&img->mu);
    pthread_mutex_unlock(&slots_mu);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  for (int64_t b = 0; b < count; b++) img->blocks[b].fd = -1;
  snprintf(img->dir, sizeof img->dir, "%s", dir);
  snprintf(img->prefix, sizeof img->prefix, "%s", prefix);
  snprintf(img->suffix, sizeof img->suffix, "%s", suffix);
  img->width = width;
  img->block_size = (uint64_t)bs;
  img->nblocks = (uint64_t)count;
  img->open_fds = 0;
  img->clock = 0;
  atomic_store(&img->used_size, (uint64_t)used);
  atomic_store(&img->reads, 0);
  atomic_store(&img->bytes, 0);
  atomic_store(&img->pieces, 0);
  atomic_store(&img->nanos, 0);
  atomic_store(&img->delay_us, 0);
  img->used = true;
  img->live = true;
  pthread_mutex_unlock(&img->mu);
  pthread_mutex_unlock(&slots_mu);
  napi_value out;
  napi_create_uint32(env, slot, &out);
  return out;
}

/* Sets the grant of the blocks in `ranges` (mutex held). */
static void set_fast (struct image *img, const double *ranges, size_t n, bool fast) {
  for (size_t i = 0; i + 1 < n; i += 2) {
    uint64_t s = ranges[i] < 0 ? 0 : (uint64_t)ranges[i];
    uint64_t e = ranges[i + 1] > (double)img->nblocks ? img->nblocks : (uint64_t)ranges[i + 1];
    for (uint64_t b = s; b < e; b++) img->blocks[b].fast = fast;
  }
}

static napi_value grant_or_revoke (napi_env env, napi_callback_info info, bool fast) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  double *ranges;
  size_t n;
  if (argc != 2) { napi_throw_type_error(env, "EINVAL", "(slot, ranges)"); return NULL; }
  struct image *img = image_arg(env, argv[0], &slot);
  if (img == NULL) return NULL;
  if (!get_f64s(env, argv[1], &ranges, &n)) { napi_throw_type_error(env, "EINVAL", "ranges must be a Float64Array"); return NULL; }
  pthread_mutex_lock(&img->mu);
  if (img->live) set_fast(img, ranges, n, fast);
  pthread_mutex_unlock(&img->mu);
  return NULL;
}

static napi_value js_grant (napi_env env, napi_callback_info info) { return grant_or_revoke(env, info, true); }
static napi_value js_revoke (napi_env env, napi_callback_info info) { return grant_or_revoke(env, info, false); }

/* Waits until no native read of the blocks is in flight, and closes their files where not granted. */
static void drain_execute (napi_env env, void *data) {
  (void)env;
  struct work *w = data;
  struct image *img = &images[w->slot];
  pthread_mutex_lock(&img->mu);
  if (w->unregister) {
    img->live = false;
    for (uint64_t b = 0; b < img->nblocks; b++) img->blocks[b].fast = false;
  }
  for (;;) {
    bool busy = false;
    if (w->unregister) {
      for (uint64_t b = 0; b < img->nblocks && !busy; b++) busy = img->blocks[b].inflight > 0;
    } else {
      for (size_t i = 0; i + 1 < w->nranges && !busy; i += 2) {
        uint64_t s = w->ranges[i] < 0 ? 0 : (uint64_t)w->ranges[i];
        uint64_t e = w->ranges[i + 1] > (double)img->nblocks ? img->nblocks : (uint64_t)w->ranges[i + 1];
        for (uint64_t b = s; b < e && !busy; b++) busy = img->blocks[b].inflight > 0;
      }
    }
    if (!busy) break;
    pthread_cond_wait(&img->cv, &img->mu);
  }
  for (uint64_t b = 0; b < img->nblocks; b++) {
    struct block *k = &img->blocks[b];
    if (k->fd >= 0 && !k->fast && k->inflight == 0) { close(k->fd); k->fd = -1; img->open_fds--; }
  }
  if (w->unregister) {
    free(img->blocks);
    img->blocks = NULL;
    img->nblocks = 0;
    w->counters[0] = (double)atomic_exchange(&img->reads, 0);
    w->counters[1] = (double)atomic_exchange(&img->bytes, 0);
    w->counters[2] = (double)atomic_exchange(&img->pieces, 0);
    w->counters[3] = (double)atomic_exchange(&img->nanos, 0) / 1e9;
  }
  pthread_mutex_unlock(&img->mu);
  if (w->unregister) {
    pthread_mutex_lock(&slots_mu);
    img->used = false;
    pthread_mutex_unlock(&slots_mu);
  }
}

static napi_value f64_array (napi_env env, const double *values, size_t n);

static void drain_complete (napi_env env, napi_status status, void *data) {
  (void)status;
  struct work *w = data;
  napi_value result;
  if (w->unregister) result = f64_array(env, w->counters, 4);
  else napi_get_undefined(env, &result);
  napi_resolve_deferred(env, w->deferred, result);
  napi_delete_async_work(env, w->work);
  free(w->ranges);
  free(w);
}

static napi_value js_drain (napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  double *ranges;
  size_t n;
  if (argc != 2) { napi_throw_type_error(env, "EINVAL", "drain(slot, ranges)"); return NULL; }
  if (image_arg(env, argv[0], &slot) == NULL) return NULL;
  if (!get_f64s(env, argv[1], &ranges, &n)) { napi_throw_type_error(env, "EINVAL", "ranges must be a Float64Array"); return NULL; }
  struct work *w = calloc(1, sizeof *w);
  if (w == NULL || (w->ranges = malloc((n == 0 ? 1 : n) * sizeof(double))) == NULL) { free(w); napi_throw_error(env, "ENOMEM", "out of memory"); return NULL; }
  memcpy(w->ranges, ranges, n * sizeof(double));
  w->nranges = n;
  w->slot = slot;
  return queue(env, w, drain_execute, drain_complete, "ukai-fuse:drain");
}

static napi_value js_unregister (napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  if (argc != 1 || image_arg(env, argv[0], &slot) == NULL) return NULL;
  /* No new read from now on (the drain, on the thread pool, waits for the ones under way). */
  pthread_mutex_lock(&images[slot].mu);
  images[slot].live = false;
  pthread_mutex_unlock(&images[slot].mu);
  struct work *w = calloc(1, sizeof *w);
  if (w == NULL) { napi_throw_error(env, "ENOMEM", "out of memory"); return NULL; }
  w->slot = slot;
  w->unregister = true;
  return queue(env, w, drain_execute, drain_complete, "ukai-fuse:unregister");
}

static napi_value js_set_used_size (napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  int64_t used;
  if (argc != 2) { napi_throw_type_error(env, "EINVAL", "setUsedSize(slot, usedSize)"); return NULL; }
  struct image *img = image_arg(env, argv[0], &slot);
  if (img == NULL) return NULL;
  if (napi_get_value_int64(env, argv[1], &used) != napi_ok || used < 0) { napi_throw_type_error(env, "EINVAL", "usedSize must be >= 0"); return NULL; }
  atomic_store(&img->used_size, (uint64_t)used);
  return NULL;
}

static napi_value f64_array (napi_env env, const double *values, size_t n) {
  napi_value ab, arr;
  void *out;
  napi_create_arraybuffer(env, n * sizeof(double), &out, &ab);
  if (n > 0) memcpy(out, values, n * sizeof(double));
  napi_create_typedarray(env, napi_float64_array, n, ab, 0, &arr);
  return arr;
}

/* takeCounters(slot) -> [reads, bytes, pieces, seconds] since the last call. */
static napi_value js_take_counters (napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  if (argc != 1) { napi_throw_type_error(env, "EINVAL", "takeCounters(slot)"); return NULL; }
  struct image *img = image_arg(env, argv[0], &slot);
  if (img == NULL) return NULL;
  double v[4] = {
    (double)atomic_exchange(&img->reads, 0),
    (double)atomic_exchange(&img->bytes, 0),
    (double)atomic_exchange(&img->pieces, 0),
    (double)atomic_exchange(&img->nanos, 0) / 1e9
  };
  return f64_array(env, v, 4);
}

/* fastBlocks(slot) -> the granted blocks as ranges [s0, e0, ...]. */
static napi_value js_fast_blocks (napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  if (argc != 1) { napi_throw_type_error(env, "EINVAL", "fastBlocks(slot)"); return NULL; }
  struct image *img = image_arg(env, argv[0], &slot);
  if (img == NULL) return NULL;
  pthread_mutex_lock(&img->mu);
  size_t cap = 16, n = 0;
  double *r = malloc(cap * sizeof *r);
  for (uint64_t b = 0; r != NULL && b < img->nblocks; b++) {
    if (!img->blocks[b].fast) continue;
    if (n > 0 && r[n - 1] == (double)b) { r[n - 1] = (double)(b + 1); continue; }
    if (n + 2 > cap) { cap *= 2; double *m = realloc(r, cap * sizeof *r); if (m == NULL) { free(r); r = NULL; break; } r = m; }
    r[n++] = (double)b;
    r[n++] = (double)(b + 1);
  }
  pthread_mutex_unlock(&img->mu);
  napi_value out = f64_array(env, r, r == NULL ? 0 : n);
  free(r);
  return out;
}

/* readFast(slot, offset, buffer) -> bytes or -1: the fast path alone (tests). */
static napi_value js_read_fast (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot;
  int64_t off;
  void *p;
  size_t len;
  if (argc != 3 || napi_get_value_uint32(env, argv[0], &slot) != napi_ok || napi_get_value_int64(env, argv[1], &off) != napi_ok ||
      napi_get_buffer_info(env, argv[2], &p, &len) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "readFast(slot, offset, buffer)");
    return NULL;
  }
  pthread_once(&images_once, images_init);
  ssize_t n = fast_read((uint64_t)slot << 32, p, len, (off_t)off);
  napi_create_int64(env, n, &out);
  return out;
}

/* heartbeat(ms): the JS thread runs; the fast path serves for `ms` more (0: without a deadline). */
static napi_value js_heartbeat (napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t ms;
  if (argc != 1 || napi_get_value_uint32(env, argv[0], &ms) != napi_ok) { napi_throw_type_error(env, "EINVAL", "heartbeat(ms)"); return NULL; }
  atomic_store(&fresh_until, ms == 0 ? 0 : now_ns() + (uint64_t)ms * 1000000u);
  return NULL;
}

/* setReadDelay(slot, microseconds): tests hold native reads in flight with it. */
static napi_value js_set_read_delay (napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  uint32_t slot, us;
  if (argc != 2) { napi_throw_type_error(env, "EINVAL", "setReadDelay(slot, microseconds)"); return NULL; }
  struct image *img = image_arg(env, argv[0], &slot);
  if (img == NULL || napi_get_value_uint32(env, argv[1], &us) != napi_ok) return NULL;
  atomic_store(&img->delay_us, us);
  return NULL;
}

struct read_work {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep;
  uint32_t slot;
  int64_t off;
  char *buf;
  size_t len;
  ssize_t result;
};

static void read_execute (napi_env env, void *data) {
  (void)env;
  struct read_work *w = data;
  w->result = fast_read((uint64_t)w->slot << 32, w->buf, w->len, (off_t)w->off);
}

static void read_complete (napi_env env, napi_status status, void *data) {
  (void)status;
  struct read_work *w = data;
  napi_value v;
  napi_create_int64(env, w->result, &v);
  napi_resolve_deferred(env, w->deferred, v);
  napi_delete_reference(env, w->keep);
  napi_delete_async_work(env, w->work);
  free(w);
}

/* readFastAsync(slot, offset, buffer) -> Promise<bytes or -1>: readFast on a thread of the pool, as a FUSE thread runs it (tests). */
static napi_value js_read_fast_async (napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], promise, name;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  struct read_work *w = calloc(1, sizeof *w);
  void *p;
  if (w == NULL || argc != 3 || napi_get_value_uint32(env, argv[0], &w->slot) != napi_ok || napi_get_value_int64(env, argv[1], &w->off) != napi_ok ||
      napi_get_buffer_info(env, argv[2], &p, &w->len) != napi_ok) {
    free(w);
    napi_throw_type_error(env, "EINVAL", "readFastAsync(slot, offset, buffer)");
    return NULL;
  }
  w->buf = p;
  napi_create_reference(env, argv[2], 1, &w->keep);
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, "ukai-fuse:readFast", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, read_execute, read_complete, w, &w->work);
  napi_queue_async_work(env, w->work);
  return promise;
}

static napi_value init (napi_env env, napi_value exports) {
  pthread_once(&images_once, images_init);
  napi_property_descriptor props[] = {
    { "mount", NULL, js_mount, NULL, NULL, NULL, napi_default, NULL },
    { "unmount", NULL, js_unmount, NULL, NULL, NULL, napi_default, NULL },
    { "reply", NULL, js_reply, NULL, NULL, NULL, napi_default, NULL },
    { "registerImage", NULL, js_register, NULL, NULL, NULL, napi_default, NULL },
    { "unregisterImage", NULL, js_unregister, NULL, NULL, NULL, napi_default, NULL },
    { "grant", NULL, js_grant, NULL, NULL, NULL, napi_default, NULL },
    { "revoke", NULL, js_revoke, NULL, NULL, NULL, napi_default, NULL },
    { "drain", NULL, js_drain, NULL, NULL, NULL, napi_default, NULL },
    { "setUsedSize", NULL, js_set_used_size, NULL, NULL, NULL, napi_default, NULL },
    { "takeCounters", NULL, js_take_counters, NULL, NULL, NULL, napi_default, NULL },
    { "fastBlocks", NULL, js_fast_blocks, NULL, NULL, NULL, napi_default, NULL },
    { "readFast", NULL, js_read_fast, NULL, NULL, NULL, napi_default, NULL },
    { "readFastAsync", NULL, js_read_fast_async, NULL, NULL, NULL, napi_default, NULL },
    { "setReadDelay", NULL, js_set_read_delay, NULL, NULL, NULL, napi_default, NULL },
    { "heartbeat", NULL, js_heartbeat, NULL, NULL, NULL, napi_default, NULL }
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
