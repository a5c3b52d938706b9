/**
 * `ukai server`: one process per node holding the metadata store, the
 * block store, the control API, and optionally the FUSE mount and NBD
 * exports, so hypervisor I/O never pays an extra local hop.
 *
 * Start-up touches nothing shared until it knows it may run: the ports
 * are checked first (in use: exit 5), then the node registers its id
 * (a live node with the same id: exit 11), and only then are images
 * loaded and served.
 */
import { createServer } from 'node:net'
import type { Config } from '../config/config.js'
import { ControlServer } from '../control/server.js'
import { UkaiError } from '../errors.js'
import { loadFuseMount, type FuseMount } from '../frontends/fuse/load.js'
import { NbdServer } from '../frontends/nbd/server.js'
import { ReplicaExports } from '../peer/replica-exports.js'
import { UkaiNode } from '../node/node.js'

export interface ServerOptions {
  mount: string | undefined
  nbd: string[]
  debug: boolean
}

interface Closable { close: () => Promise<void> }

const log = (s: string): void => { process.stderr.write(`ukai: ${s}\n`) }

const bracketed = (host: string): string => host.includes(':') ? `[${host.replace(/^\[|\]$/g, '')}]` : host

/** Fails with UKAI_ERR_BUSY (exit 5) when something listens on the control or proxy port already. */
async function checkPorts (config: Config): Promise<void> {
  for (const [key, host, port] of [['control_port', config.control_address, config.control_port], ['proxy_port', config.proxy_address, config.proxy_port]] as const) {
    const s = createServer()
    await new Promise<void>((resolve, reject) => {
      s.once('error', (err: NodeJS.ErrnoException) => {
        reject(new UkaiError(err.code === 'EADDRINUSE' ? 'UKAI_ERR_BUSY' : 'UKAI_ERR_INVALID_CONFIG',
          `cannot listen on ${bracketed(host)}:${port} (${key}): ${err.code === 'EADDRINUSE' ? 'another process listens there' : err.message}`, { key }))
      })
      s.listen(port, host.replace(/^\[|\]$/g, ''), () => s.close(() => resolve()))
    })
  }
}

export async function runServer (config: Config, options: ServerOptions): Promise<number> {
  // Before anything is touched: a mount without libfuse is refused at once.
  const FuseMountClass = options.mount !== undefined ? await loadFuseMount(config.fuse_engine) : undefined
  await checkPorts(config)
  const node = await UkaiNode.start(config, log)
  const control = new ControlServer(node)
  const nbdServers: Closable[] = []
  let fuse: FuseMount | undefined

  let stopping: Promise<void> | undefined
  const stop = async (): Promise<void> => {
    for (const s of nbdServers) await s.close().catch((err) => log(`closing NBD: ${(err as Error).message}`))
    if (fuse !== undefined) await fuse.unmount().catch((err) => log(`unmounting ${fuse!.mountpoint}: ${(err as Error).message}`))
    await control.close()
    await node.close()
  }
  const done = new Promise<number>((resolve) => {
    const onSignal = (sig: string): void => {
      if (stopping !== undefined) {
        log(`${sig} again: exiting now`)
        process.exit(1)
      }
      log(`${sig}: stopping`)
      stopping = stop()
      stopping.then(() => resolve(0), (err) => { log(`stopping: ${(err as Error).message}`); resolve(1) })
    }
    process.on('SIGINT', () => onSignal('SIGINT'))
    process.on('SIGTERM', () => onSignal('SIGTERM'))
  })

  try {
    await control.listen(config.control_port, config.control_address)
    if (options.mount !== undefined) {
      fuse = new FuseMountClass!(node, options.mount)
      await fuse.mount({ debug: options.debug })
    }
    // The peer protocol: this node's replicas for the other nodes.
    const peer = new NbdServer(node, { exports: new ReplicaExports(node) })
    nbdServers.push(peer)
    await peer.listen(`${bracketed(config.proxy_address)}:${config.proxy_port}`)
    for (const spec of options.nbd) {
      const s = new NbdServer(node)
      nbdServers.push(s)
      await s.listen(spec)
    }
  } catch (err) {
    await stop().catch(() => {})
    throw err
  }
  const parts = [`node ${config.id}`, `metadata ${node.store.description}`, `control ${config.control_address}:${config.control_port}`, `peers ${config.proxy_address}:${config.proxy_port}`]
  if (fuse !== undefined) parts.push(`mount ${fuse.mountpoint}`)
  for (const spec of options.nbd) parts.push(`nbd ${spec}`)
  parts.push(`${node.imageNames().length} image(s)`)
  // Tests and scripts wait for this line.
  process.stdout.write(`ukai: ready: ${parts.join(', ')}\n`)
  return await done
}
