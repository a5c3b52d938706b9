/**
 * `ukai server`: one process per node holding the metadata store, the
 * block store, the control API, and optionally the FUSE mount and NBD
 * exports, so hypervisor I/O never pays an extra local hop.
 */
import type { Config } from '../config/config.js'
import { ControlServer } from '../control/server.js'
import { FuseMount } from '../frontends/fuse/mount.js'
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

export async function runServer (config: Config, options: ServerOptions): Promise<number> {
  const node = await UkaiNode.start(config)
  node.on('warning', (msg: string) => log(`warning: ${msg}`))
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
    // Other nodes find this node's control API through its registration.
    await node.images.directory.register()
    if (options.mount !== undefined) {
      fuse = new FuseMount(node, options.mount)
      await fuse.mount({ debug: options.debug })
    }
    // The peer protocol: this node's replicas for the other nodes.
    const peer = new NbdServer(node, { exports: new ReplicaExports(node) })
    nbdServers.push(peer)
    const proxyHost = config.proxy_address.includes(':') ? `[${config.proxy_address.replace(/^\[|\]$/g, '')}]` : config.proxy_address
    await peer.listen(`${proxyHost}:${config.proxy_port}`)
    for (const spec of options.nbd) {
      const s = new NbdServer(node)
      nbdServers.push(s)
      await s.listen(spec)
    }
  } catch (err) {
    await stop().catch(() => {})
    throw err
  }
  const parts = [`node ${config.id}`, `control ${config.control_address}:${config.control_port}`, `peers ${config.proxy_address}:${config.proxy_port}`]
  if (fuse !== undefined) parts.push(`mount ${fuse.mountpoint}`)
  for (const spec of options.nbd) parts.push(`nbd ${spec}`)
  parts.push(`${node.imageNames().length} image(s)`)
  // Tests and scripts wait for this line.
  process.stdout.write(`ukai: ready: ${parts.join(', ')}\n`)
  return await done
}
