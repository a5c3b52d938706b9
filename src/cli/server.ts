/**
 * `ukai server`: one process per node holding the metadata store, the
 * block store, the control API, and optionally the FUSE mount and NBD
 * exports, so hypervisor I/O never pays an extra local hop.
 */
import type { Config } from '../config/config.js'
import { ControlServer } from '../control/server.js'
import { FuseMount } from '../frontends/fuse/mount.js'
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
    if (options.mount !== undefined) {
      fuse = new FuseMount(node, options.mount)
      await fuse.mount({ debug: options.debug })
    }
    if (options.nbd.length > 0) {
      // Loaded only when asked for.
      const nbdModule = '../frontends/nbd/server.js'
      const { NbdServer } = await import(nbdModule) as { NbdServer: new (n: UkaiNode) => Closable & { listen: (s: string) => Promise<void> } }
      for (const spec of options.nbd) {
        const s = new NbdServer(node)
        await s.listen(spec)
        nbdServers.push(s)
      }
    }
  } catch (err) {
    await stop().catch(() => {})
    throw err
  }
  const parts = [`node ${config.id}`, `control ${config.control_address}:${config.control_port}`]
  if (fuse !== undefined) parts.push(`mount ${fuse.mountpoint}`)
  for (const spec of options.nbd) parts.push(`nbd ${spec}`)
  parts.push(`${node.imageNames().length} image(s)`)
  // Tests and scripts wait for this line.
  process.stdout.write(`ukai: ready: ${parts.join(', ')}\n`)
  return await done
}
