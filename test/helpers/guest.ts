/**
 * A tiny Linux guest for tests that boot a VM on a UKAI disk: the host's
 * Debian kernel, and an initramfs (built here, offline, in pure Node) with
 * static busybox, the virtio block modules and an /init that runs a disk
 * workload on /dev/vda forever.
 *
 * The workload. The first `mib` MiB of the disk are `mib * 256` slots of
 * 4 KiB. Round `seq` (1, 2, ...) writes the record of (seq, slot) to slot
 * `seq * 7919 mod slots` with O_DIRECT (busybox dd oflag=direct), reads it
 * back with O_DIRECT and compares, then re-reads the slot of a random
 * earlier round still in the current cycle of `slots` rounds (so not yet
 * overwritten) and compares it with the record of that round. A record is
 * one 64-byte line repeated 64 times:
 *
 *   UKAIREC seq=0000000042 sector=0000001234 run=1a2b3c4d..........|
 *
 * `sector` is the record's own position in 512-byte sectors and `run` a
 * token of the boot (kernel command line), so any 4 KiB of the disk can be
 * checked on its own (checkRecords): all zeros (never written), or a valid
 * record that belongs where it is.
 *
 * The guest's lines on the serial console (ttyS0):
 *   UKAI-GUEST ready slots=N run=TOKEN       once, when the workload starts
 *   UKAI-GUEST wrote SECTOR SEQ              every round, after the write read back correctly
 *   UKAI-GUEST ok SEQ                        every `every` rounds
 *   UKAI-GUEST error DETAILS                 any dd failure or mismatch (the workload goes on)
 * The kernel runs at loglevel=4: only KERN_ERR and worse reach the console,
 * which includes the block layer's "I/O error, dev vda, sector ..." and
 * "Buffer I/O error" lines.
 */
import { spawnSync } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { accessSync, constants, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'

export const RECORD_SIZE = 4096
export const LINE_SIZE = 64
/** The slot stride of the workload (a prime: coprime with every slot count mib * 256 unless mib is a multiple of it). */
export const STRIDE = 7919
const BUILDER_VERSION = 'ukai-guest-1'
/** Modules /dev/vda needs, with their dependencies (from modules.dep) loaded first. */
const WANTED_MODULES = ['virtio_pci', 'virtio_blk']

// ---------------------------------------------------------------------------
// What the host has

export interface GuestTools {
  qemu: string
  busybox: string
  kernel: string
  /** /lib/modules/<version> of the kernel. */
  modulesDir: string
  version: string
}

export type Availability = { ok: true, tools: GuestTools } | { ok: false, reason: string }

function which (cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    if (dir === '') continue
    const p = join(dir, cmd)
    try { accessSync(p, constants.X_OK); return p } catch {}
  }
  return undefined
}

function readable (p: string): boolean {
  try { accessSync(p, constants.R_OK); return true } catch { return false }
}

/**
 * Finds qemu-system-x86_64, a static busybox and a kernel with its modules:
 * $UKAI_GUEST_KERNEL (its version from the file name, vmlinuz-VERSION) or the
 * newest /boot/vmlinuz-VERSION that has /lib/modules/VERSION/modules.dep.
 */
export function guestAvailable (): Availability {
  if (process.platform !== 'linux' || process.arch !== 'x64') return { ok: false, reason: `guest tests need linux/x64, this is ${process.platform}/${process.arch}` }
  const qemu = which('qemu-system-x86_64')
  if (qemu === undefined) return { ok: false, reason: 'qemu-system-x86_64 not found (Debian package qemu-system-x86)' }
  const busybox = ['/usr/bin/busybox', '/bin/busybox'].find(readable) ?? which('busybox')
  if (busybox === undefined) return { ok: false, reason: 'busybox not found (Debian package busybox-static)' }
  if (!isStaticElf(busybox)) return { ok: false, reason: `${busybox} is not a statically linked x86-64 program (Debian package busybox-static)` }
  let candidates: string[]
  const forced = process.env.UKAI_GUEST_KERNEL
  if (forced !== undefined && forced !== '') {
    candidates = [forced]
  } else {
    let names: string[] = []
    try { names = readdirSync('/boot') } catch {}
    candidates = names.filter((n) => n.startsWith('vmlinuz-')).sort(compareVersions).reverse().map((n) => join('/boot', n))
  }
  for (const kernel of candidates) {
    const version = kernel.replace(/^.*vmlinuz-/, '')
    const modulesDir = join('/lib/modules', version)
    if (!readable(kernel)) continue
    if (!readable(join(modulesDir, 'modules.dep'))) continue
    return { ok: true, tools: { qemu, busybox, kernel, modulesDir, version } }
  }
  return { ok: false, reason: `no readable kernel with modules (${forced ?? '/boot/vmlinuz-*'} and /lib/modules/VERSION/modules.dep; Debian package linux-image-amd64)` }
}

/** True for an x86-64 ELF executable without a program interpreter (PT_INTERP), i.e. statically linked. */
function isStaticElf (path: string): boolean {
  let b: Buffer
  try { b = readFileSync(path) } catch { return false }
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1 || b.readUInt16LE(18) !== 62) return false
  const phoff = Number(b.readBigUInt64LE(32))
  const phentsize = b.readUInt16LE(54)
  const phnum = b.readUInt16LE(56)
  for (let i = 0; i < phnum; i++) {
    const at = phoff + i * phentsize
    if (at + 4 > b.length) return false
    if (b.readUInt32LE(at) === 3) return false // PT_INTERP
  }
  return true
}

function compareVersions (a: string, b: string): number {
  const pa = a.split(/[^0-9]+/).filter((s) => s !== '').map(Number)
  const pb = b.split(/[^0-9]+/).filter((s) => s !== '').map(Number)
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? -1) - (pb[i] ?? -1)
    if (d !== 0) return d
  }
  return a < b ? -1 : a > b ? 1 : 0
}

// ---------------------------------------------------------------------------
// Kernel modules

interface Module { name: string, path: string }

/** The modules `wanted` needs, dependencies first; built-in ones are left out. */
export function resolveModules (modulesDir: string, wanted: string[]): Module[] {
  const dep = readFileSync(join(modulesDir, 'modules.dep'), 'utf8')
  const norm = (n: string): string => n.replace(/-/g, '_')
  const nameOf = (rel: string): string => norm(rel.replace(/^.*\//, '').replace(/\.ko(\.(xz|zst|gz))?$/, ''))
  const deps = new Map<string, { path: string, deps: string[] }>()
  for (const line of dep.split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line)
    if (m === null) continue
    deps.set(nameOf(m[1]!), { path: m[1]!, deps: m[2]!.split(/\s+/).filter((s) => s !== '').map(nameOf) })
  }
  let builtin = new Set<string>()
  try {
    builtin = new Set(readFileSync(join(modulesDir, 'modules.builtin'), 'utf8').split('\n').filter((l) => l !== '').map(nameOf))
  } catch {}
  const out: Module[] = []
  const seen = new Set<string>()
  const visit = (name: string, chain: string[]): void => {
    if (seen.has(name)) return
    if (chain.includes(name)) throw new Error(`module dependency cycle: ${[...chain, name].join(' -> ')}`)
    const entry = deps.get(name)
    if (entry === undefined) {
      if (builtin.has(name)) { seen.add(name); return }
      throw new Error(`module ${name} is neither in ${modulesDir}/modules.dep nor built in`)
    }
    // modules.dep lists a module's dependencies, the deepest last: load them in reverse.
    for (const d of [...entry.deps].reverse()) visit(d, [...chain, name])
    seen.add(name)
    out.push({ name, path: join(modulesDir, entry.path) })
  }
  for (const w of wanted) visit(norm(w), [])
  return out
}

/** A module's ELF bytes (busybox insmod reads neither xz nor zstd). */
function moduleBytes (path: string): Buffer {
  const tool = path.endsWith('.xz') ? ['xz', '-dc'] : path.endsWith('.zst') ? ['zstd', '-dc'] : path.endsWith('.gz') ? ['gzip', '-dc'] : undefined
  if (tool === undefined) return readFileSync(path)
  const r = spawnSync(tool[0]!, [tool[1]!, path], { maxBuffer: 64 * 2 ** 20 })
  if (r.status !== 0) throw new Error(`${tool.join(' ')} ${path} failed: ${r.error?.message ?? r.stderr.toString()}`)
  return r.stdout
}

// ---------------------------------------------------------------------------
// newc cpio

export type CpioEntry =
  | { type: 'dir', name: string, mode?: number }
  | { type: 'file', name: string, data: Buffer, mode?: number }
  | { type: 'symlink', name: string, target: string }
  | { type: 'chardev', name: string, major: number, minor: number, mode?: number }

/** The "newc" (SVR4, no CRC) cpio archive of `entries`, as the kernel's initramfs unpacker reads it. */
export function cpioNewc (entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = []
  let size = 0
  const push = (b: Buffer): void => { parts.push(b); size += b.length }
  const pad4 = (): void => { if (size % 4 !== 0) push(Buffer.alloc(4 - size % 4)) }
  const hex = (n: number): string => (n >>> 0).toString(16).padStart(8, '0')
  let ino = 1
  const record = (name: string, mode: number, data: Buffer, rdevMajor = 0, rdevMinor = 0, nlink = 1): void => {
    const nameBuf = Buffer.from(name + '\0')
    const header = '070701' + [
      ino++, mode, 0, 0, nlink, 0, data.length, 0, 0, rdevMajor, rdevMinor, nameBuf.length, 0
    ].map(hex).join('')
    push(Buffer.from(header, 'ascii'))
    push(nameBuf)
    pad4()
    push(data)
    pad4()
  }
  for (const e of entries) {
    const name = e.name.replace(/^\/+/, '')
    switch (e.type) {
      case 'dir': record(name, 0o040000 | (e.mode ?? 0o755), Buffer.alloc(0), 0, 0, 2); break
      case 'file': record(name, 0o100000 | (e.mode ?? 0o644), e.data); break
      case 'symlink': record(name, 0o120777, Buffer.from(e.target)); break
      case 'chardev': record(name, 0o020000 | (e.mode ?? 0o600), Buffer.alloc(0), e.major, e.minor); break
    }
  }
  ino = 0
  record('TRAILER!!!', 0, Buffer.alloc(0), 0, 0, 1)
  return Buffer.concat(parts)
}

// ---------------------------------------------------------------------------
// The /init script

function initScript (modules: Module[]): string {
  const insmods = modules.map((m) => `insmod /lib/modules/${m.name}.ko || say error insmod ${m.name} failed`).join('\n')
  return `#!/bin/sh
# UKAI test guest: a disk workload on /dev/vda (see test/helpers/guest.ts).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
mount -t tmpfs tmpfs /tmp

say () { echo "UKAI-GUEST $*"; }
idle () { while :; do sleep 3600; done; }

# ukai.NAME=VALUE from the kernel command line, else the default.
arg () {
  v=$2
  for w in $(cat /proc/cmdline); do
    case "$w" in "ukai.$1="*) v=\${w#*=} ;; esac
  done
  echo "$v"
}
mib=$(arg mib 8)
every=$(arg every 10)
run=$(arg run 00000000)
seed=$(arg seed 1)

${insmods}

n=0
while [ ! -b /dev/vda ]; do
  n=$((n + 1))
  if [ $n -gt 600 ]; then say error no /dev/vda after 60 s; idle; fi
  sleep 0.1
done

slots=$((mib * 256))
sectors=$(cat /sys/block/vda/size)
if [ "$sectors" -lt $((slots * 8)) ]; then say error /dev/vda has $sectors sectors, the workload needs $((slots * 8)); idle; fi

# The last 10 digits of $1, zero-padded, into Z (no subshell).
pad10 () { Z="0000000000$1"; Z=\${Z#"\${Z%??????????}"}; }
# The record of round $1 in slot $2, into R.
mkrec () {
  pad10 "$1"; s=$Z
  pad10 $(($2 * 8)); t=$Z
  R="UKAIREC seq=$s sector=$t run=$run..........|"
  R=$R$R; R=$R$R; R=$R$R; R=$R$R; R=$R$R; R=$R$R
}
clean () { tr -c 'A-Za-z0-9=.:/ |_-' '?' | head -c 200; }
fail () { say error "$*"; sleep 1; }

seq=0
x=$seed
say ready slots=$slots run=$run
while :; do
  seq=$((seq + 1))
  slot=$(((seq * ${STRIDE}) % slots))
  mkrec $seq $slot
  printf '%s' "$R" > /tmp/rec
  if ! dd if=/tmp/rec of=/dev/vda bs=4096 count=1 seek=$slot oflag=direct conv=notrunc 2>/tmp/err; then
    fail "write seq=$seq sector=$((slot * 8)): $(clean </tmp/err)"; continue
  fi
  if ! got=$(dd if=/dev/vda bs=4096 count=1 skip=$slot iflag=direct 2>/tmp/err); then
    fail "read seq=$seq sector=$((slot * 8)): $(clean </tmp/err)"; continue
  fi
  if [ "$got" != "$R" ]; then
    fail "readback seq=$seq sector=$((slot * 8)) got: $(printf '%s' "$got" | clean)"; continue
  fi
  say wrote $((slot * 8)) $seq
  if [ $seq -gt 1 ]; then
    # A random earlier round of the current cycle: its slot still holds its record.
    x=$(((x * 1103515245 + 12345) % 2147483648))
    span=$((seq - 1))
    if [ $span -ge $slots ]; then span=$((slots - 1)); fi
    r=$((seq - 1 - (x / 65536) % span))
    s2=$(((r * ${STRIDE}) % slots))
    mkrec $r $s2
    if ! got=$(dd if=/dev/vda bs=4096 count=1 skip=$s2 iflag=direct 2>/tmp/err); then
      fail "reread seq=$r sector=$((s2 * 8)) at round $seq: $(clean </tmp/err)"; continue
    fi
    if [ "$got" != "$R" ]; then
      fail "reread seq=$r sector=$((s2 * 8)) at round $seq got: $(printf '%s' "$got" | clean)"; continue
    fi
  fi
  if [ $((seq % every)) -eq 0 ]; then say ok $seq; fi
done
`
}

// ---------------------------------------------------------------------------
// Building

export interface Guest {
  kernel: string
  initrd: string
  /** Kernel version the modules are from. */
  version: string
  /** Modules the initramfs loads, in order. */
  modules: string[]
}

/**
 * Builds the initramfs once per content (busybox, modules, /init, this
 * builder) under `cacheDir` (default: the OS temp dir) as
 * ukai-guest-<hash>/initrd.gz, and returns it with the kernel.
 */
export function buildGuest (cacheDir: string = tmpdir()): Guest {
  const avail = guestAvailable()
  if (!avail.ok) throw new Error(avail.reason)
  const { busybox, kernel, modulesDir, version } = avail.tools
  const modules = resolveModules(modulesDir, WANTED_MODULES)
  const bb = readFileSync(busybox)
  const list = spawnSync(busybox, ['--list'], { encoding: 'utf8' })
  if (list.status !== 0) throw new Error(`${busybox} --list failed: ${list.stderr}`)
  const applets = list.stdout.split('\n').map((s) => s.trim()).filter((s) => /^[A-Za-z0-9_.[-]+$/.test(s) && s !== 'busybox').sort()
  const modData = modules.map((m) => ({ name: m.name, data: moduleBytes(m.path) }))
  const init = initScript(modules)

  const h = createHash('sha256').update(BUILDER_VERSION).update('\0').update(bb).update('\0').update(init).update('\0').update(applets.join(','))
  for (const m of modData) h.update('\0').update(m.name).update('\0').update(m.data)
  const hash = h.digest('hex').slice(0, 16)
  const dir = join(cacheDir, `ukai-guest-${hash}`)
  const initrd = join(dir, 'initrd.gz')
  const result: Guest = { kernel, initrd, version, modules: modules.map((m) => m.name) }
  if (existsSync(initrd)) return result

  const entries: CpioEntry[] = []
  for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'lib', 'lib/modules', 'root']) entries.push({ type: 'dir', name: d })
  entries.push({ type: 'chardev', name: 'dev/console', major: 5, minor: 1 })
  entries.push({ type: 'chardev', name: 'dev/null', major: 1, minor: 3, mode: 0o666 })
  entries.push({ type: 'file', name: 'bin/busybox', data: bb, mode: 0o755 })
  for (const a of applets) entries.push({ type: 'symlink', name: `bin/${a}`, target: 'busybox' })
  for (const m of modData) entries.push({ type: 'file', name: `lib/modules/${m.name}.ko`, data: m.data })
  entries.push({ type: 'file', name: 'init', data: Buffer.from(init), mode: 0o755 })
  const image = gzipSync(cpioNewc(entries), { level: 6 })

  mkdirSync(dir, { recursive: true })
  const tmp = `${initrd}.${process.pid}.${randomBytes(4).toString('hex')}`
  writeFileSync(tmp, image)
  writeFileSync(join(dir, 'init'), init)
  renameSync(tmp, initrd)
  return result
}

export interface WorkloadOptions {
  /** MiB of the disk the workload covers (default 8). */
  mib?: number
  /** An `ok` line every this many rounds (default 10). */
  every?: number
  /** Token of this boot written into every record (8 hex digits; default random). */
  run?: string
  /** Seed of the re-read choice (default 1). */
  seed?: number
}

/** The kernel command line of the guest, and the `run` token its records carry. */
export function guestCmdline (opts: WorkloadOptions = {}): { append: string, run: string, mib: number } {
  const run = opts.run ?? randomBytes(4).toString('hex')
  if (!/^[0-9a-f]{8}$/.test(run)) throw new Error(`run token must be 8 lowercase hex digits: ${run}`)
  const mib = opts.mib ?? 8
  const every = opts.every ?? 10
  const seed = opts.seed ?? 1
  for (const [k, v] of Object.entries({ mib, every, seed })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`${k} must be a positive integer: ${v}`)
  }
  return {
    run,
    mib,
    append: [
      'console=ttyS0', 'loglevel=4', 'panic=-1', 'rdinit=/init', '8250.nr_uarts=1', 'random.trust_cpu=on',
      `ukai.mib=${mib}`, `ukai.every=${every}`, `ukai.run=${run}`, `ukai.seed=${seed}`
    ].join(' ')
  }
}

// ---------------------------------------------------------------------------
// Reading what the guest did

/** The 4 KiB record of round `seq` at `sector` for boot `run`. */
export function expectedRecord (seq: number, sector: number, run: string): Buffer {
  const line = `UKAIREC seq=${String(seq % 1e10).padStart(10, '0')} sector=${String(sector % 1e10).padStart(10, '0')} run=${run}..........|`
  if (line.length !== LINE_SIZE) throw new Error(`record line has ${line.length} bytes`)
  return Buffer.from(line.repeat(RECORD_SIZE / LINE_SIZE), 'ascii')
}

export interface DiskCheck {
  /** sector -> seq of every valid record. */
  records: Map<number, number>
  /** 4 KiB slots of zeros (never written). */
  empty: number
  /** Slots that are neither: what is wrong with each. */
  bad: string[]
  /** Highest seq on the disk (0 if none). */
  maxSeq: number
}

/** Checks every 4 KiB of `buf` (the disk from byte 0) on its own: zeros, or the valid record of its own sector. */
export function checkRecords (buf: Buffer, run: string): DiskCheck {
  const records = new Map<number, number>()
  const bad: string[] = []
  let empty = 0
  let maxSeq = 0
  const re = /^UKAIREC seq=(\d{10}) sector=(\d{10}) run=([0-9a-f]{8})\.{10}\|$/
  for (let off = 0; off + RECORD_SIZE <= buf.length; off += RECORD_SIZE) {
    const chunk = buf.subarray(off, off + RECORD_SIZE)
    const sector = off / 512
    if (chunk.every((b) => b === 0)) { empty++; continue }
    const head = chunk.subarray(0, LINE_SIZE).toString('latin1')
    const m = re.exec(head)
    if (m === null) { bad.push(`sector ${sector}: not a record: ${JSON.stringify(head)}`); continue }
    const seq = Number(m[1])
    if (Number(m[2]) !== sector) { bad.push(`sector ${sector}: holds the record of sector ${Number(m[2])} (seq ${seq})`); continue }
    if (m[3] !== run) { bad.push(`sector ${sector}: record of another boot (run ${m[3]!}, expected ${run})`); continue }
    if (!chunk.equals(expectedRecord(seq, sector, run))) { bad.push(`sector ${sector}: record seq ${seq} is torn or corrupt`); continue }
    records.set(sector, seq)
    if (seq > maxSeq) maxSeq = seq
  }
  return { records, empty, bad, maxSeq }
}

export interface GuestLog {
  ready: boolean
  /** The run token from the ready line. */
  run: string | undefined
  /** seq of every `ok` line, in order. */
  oks: number[]
  /** Every `UKAI-GUEST error` line. */
  errors: string[]
  /** Kernel lines about I/O errors. */
  ioErrors: string[]
  /** sector -> seq of the last `wrote` line for it. */
  wrote: Map<number, number>
  /** Highest seq of a `wrote` line (0 if none). */
  lastWrote: number
}

export const IO_ERROR_RE = /I\/O error|blk_update_request|Buffer I\/O error/

/** Parses the serial console output of a guest. */
export function parseGuestLog (text: string): GuestLog {
  const log: GuestLog = { ready: false, run: undefined, oks: [], errors: [], ioErrors: [], wrote: new Map(), lastWrote: 0 }
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '')
    const at = line.indexOf('UKAI-GUEST ')
    if (at >= 0) {
      const rest = line.slice(at + 'UKAI-GUEST '.length)
      let m: RegExpExecArray | null
      if ((m = /^ready slots=\d+ run=([0-9a-f]{8})/.exec(rest)) !== null) {
        log.ready = true
        log.run = m[1]
      } else if ((m = /^ok (\d+)$/.exec(rest)) !== null) {
        log.oks.push(Number(m[1]))
      } else if ((m = /^wrote (\d+) (\d+)$/.exec(rest)) !== null) {
        const seq = Number(m[2])
        log.wrote.set(Number(m[1]), seq)
        if (seq > log.lastWrote) log.lastWrote = seq
      } else if (rest.startsWith('error')) {
        log.errors.push(rest)
      }
      continue
    }
    if (IO_ERROR_RE.test(line)) log.ioErrors.push(line)
  }
  return log
}

/**
 * Compares the disk (checkRecords) with what the guest said it wrote, for
 * a guest that is paused (or gone): every slot the log names holds that
 * round's record or a later one, and nothing on the disk is newer than the
 * last logged round plus `inFlight` rounds whose lines may still have been
 * in the guest's tty buffer. Returns the problems found (none: consistent).
 */
export function compareDiskWithLog (disk: DiskCheck, log: GuestLog, inFlight = 3): string[] {
  const problems = [...disk.bad]
  for (const [sector, seq] of log.wrote) {
    const onDisk = disk.records.get(sector)
    if (onDisk === undefined) problems.push(`sector ${sector}: the guest wrote seq ${seq} there, the disk holds no record`)
    else if (onDisk < seq) problems.push(`sector ${sector}: the guest wrote seq ${seq} there, the disk holds the older seq ${onDisk}`)
  }
  for (const [sector, seq] of disk.records) {
    if (seq > log.lastWrote + inFlight) problems.push(`sector ${sector}: seq ${seq} on the disk, but the guest logged only up to ${log.lastWrote}`)
    else if (seq <= log.lastWrote && log.wrote.get(sector) !== seq) problems.push(`sector ${sector}: seq ${seq} on the disk, the guest's last write there was ${log.wrote.get(sector) ?? 'none'}`)
  }
  return problems
}
