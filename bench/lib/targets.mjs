/**
 * The targets fio is pointed at, and the daemons that serve the peers.
 *
 * - `local`: the reference file itself, through the page cache: the limit.
 * - `bindfs`: `bindfs -o big_writes` over the reference file's directory
 *   (libfuse 2, as UKAI's mount): the FUSE peer.
 * - `qemu-nbd`, `nbdkit`: `qemu-nbd` and `nbdkit file` serving the
 *   reference file on unix sockets: the NBD peers. qemu-nbd runs with
 *   `--cache=writeback --aio=threads` (page cache, as every other target).
 * - `nbdkit-chain`: `nbdkit nbd` forwarding to `nbdkit file`: two NBD hops
 *   over loopback, the peer of UKAI reaching its only replica on another
 *   node (client -> node A -> node B -> block files).
 * - `ukai-*`: images of UKAI node A, through its FUSE mount or NBD socket.
 */
import { mkdir, readFile, stat } from 'node:fs/promises'
import { connect } from 'node:net'
import { basename, dirname, join } from 'node:path'
import { Daemon, trackMount, unmount, untrackMount, waitFor } from './proc.mjs'

/**
 * @typedef {import('./fio.mjs').FioTarget} FioTarget
 * @typedef {{ id: string, label: string, fio: FioTarget }} Target
 */

export async function isMounted (dir) {
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  return text.split('\n').some((l) => l.split(' ')[4] === dir)
}

async function socketAnswers (path) {
  if (await stat(path).catch(() => undefined) === undefined) return false
  return await new Promise((resolve) => {
    const s = connect({ path })
    s.once('connect', () => { s.destroy(); resolve(true) })
    s.once('error', () => resolve(false))
  })
}

/**
 * The peers' daemons over one reference file, started and stopped together.
 */
export class Peers {
  /**
   * @param {string} reference the reference file
   * @param {string} dir where sockets, mount points and logs go
   */
  constructor (reference, dir) {
    this.reference = reference
    this.dir = dir
    this.bindfsMount = join(dir, 'bindfs')
    this.qemuSocket = join(dir, 'qemu-nbd.sock')
    this.nbdkitSocket = join(dir, 'nbdkit.sock')
    this.chainSocket = join(dir, 'nbdkit-chain.sock')
    /** @type {Daemon[]} */
    this.daemons = []
  }

  async start () {
    await mkdir(this.bindfsMount, { recursive: true })
    const log = (n) => join(this.dir, `${n}.log`)
    // bindfs in the foreground (-f) so that its PID is ours to end.
    trackMount(this.bindfsMount)
    const bindfs = new Daemon('bindfs', 'bindfs', ['-f', '-o', 'big_writes', dirname(this.reference), this.bindfsMount], { log: log('bindfs') })
    await bindfs.start()
    this.daemons.push(bindfs)
    await waitFor('the bindfs mount', async () => await isMounted(this.bindfsMount))

    const qemu = new Daemon('qemu-nbd', 'qemu-nbd', [
      '--format=raw', '--socket', this.qemuSocket, '--export-name=local', '--persistent', '--shared=16',
      '--cache=writeback', '--aio=threads', this.reference
    ], { log: log('qemu-nbd') })
    await qemu.start()
    this.daemons.push(qemu)
    await waitFor('qemu-nbd', async () => await socketAnswers(this.qemuSocket))

    const kit = new Daemon('nbdkit', 'nbdkit', ['--foreground', '--exit-with-parent', '--unix', this.nbdkitSocket, '--exportname', 'local', 'file', `file=${this.reference}`], { log: log('nbdkit') })
    await kit.start()
    this.daemons.push(kit)
    await waitFor('nbdkit', async () => await socketAnswers(this.nbdkitSocket))

    const chain = new Daemon('nbdkit chain', 'nbdkit', ['--foreground', '--exit-with-parent', '--unix', this.chainSocket, '--exportname', 'local', 'nbd', `socket=${this.nbdkitSocket}`, 'export=local'], { log: log('nbdkit-chain') })
    await chain.start()
    this.daemons.push(chain)
    await waitFor('nbdkit chain', async () => await socketAnswers(this.chainSocket))
  }

  async stop () {
    for (const d of this.daemons.reverse()) await d.stop()
    this.daemons = []
    await unmount(this.bindfsMount)
    untrackMount(this.bindfsMount)
  }

  /** @returns {Record<string, Target>} */
  targets () {
    const nbd = (sock) => ({ kind: 'nbd', uri: `nbd+unix:///local?socket=${sock}` })
    return {
      local: { id: 'local', label: 'local file', fio: { kind: 'file', filename: this.reference, direct: false } },
      bindfs: { id: 'bindfs', label: 'bindfs -o big_writes', fio: { kind: 'file', filename: join(this.bindfsMount, basename(this.reference)), direct: true } },
      'qemu-nbd': { id: 'qemu-nbd', label: 'qemu-nbd', fio: nbd(this.qemuSocket) },
      nbdkit: { id: 'nbdkit', label: 'nbdkit file', fio: nbd(this.nbdkitSocket) },
      'nbdkit-chain': { id: 'nbdkit-chain', label: 'nbdkit nbd → nbdkit file', fio: nbd(this.chainSocket) }
    }
  }
}

/**
 * UKAI targets on node A.
 * @param {import('./ukai.mjs').UkaiNode} nodeA
 * @param {{ one: string, two: string, remote: string }} images
 * @returns {Record<string, Target>}
 */
export function ukaiTargets (nodeA, images) {
  const nbd = (image) => ({ kind: 'nbd', uri: `nbd+unix:///${image}?socket=${nodeA.nbdSocket}` })
  return {
    'ukai-fuse': { id: 'ukai-fuse', label: 'UKAI FUSE (1 replica)', fio: { kind: 'file', filename: join(nodeA.mountpoint, images.one), direct: true } },
    'ukai-nbd': { id: 'ukai-nbd', label: 'UKAI NBD (1 replica)', fio: nbd(images.one) },
    'ukai-nbd-2': { id: 'ukai-nbd-2', label: 'UKAI NBD (2 replicas)', fio: nbd(images.two) },
    'ukai-nbd-remote': { id: 'ukai-nbd-remote', label: 'UKAI NBD (replica on the other node)', fio: nbd(images.remote) }
  }
}
