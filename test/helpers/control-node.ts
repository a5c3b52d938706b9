/**
 * A real node and its control API in this process, on loopback ports of
 * its own, over an embedded store in a temp directory: for tests that
 * call the API directly (no `ukai server` process).
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseConfig } from '../../src/config/config.js'
import { ControlServer } from '../../src/control/server.js'
import { UkaiNode } from '../../src/node/node.js'
import { freePort } from './node-process.js'

export interface ControlNode {
  dir: string
  node: UkaiNode
  control: ControlServer
  /** The control API's port on 127.0.0.1. */
  port: number
  /** The control API's bearer token. */
  token: string
  /** Stops the API and the node, and removes the directory. */
  close: () => Promise<void>
}

export async function startControlNode (prefix: string): Promise<ControlNode> {
  const dir = await mkdtemp(join(tmpdir(), prefix))
  const port = await freePort()
  const proxy = await freePort()
  const node = await UkaiNode.start(parseConfig({ image_root: 'images', metadata_root: 'metadata', id: `127.0.0.1:${proxy}`, proxy_port: proxy, control_port: port, control_address: '127.0.0.1' }, dir))
  const control = new ControlServer(node)
  await control.listen(port, '127.0.0.1')
  const token = await node.images.directory.controlToken()
  return {
    dir,
    node,
    control,
    port,
    token,
    close: async () => {
      await control.close()
      await node.close()
      await rm(dir, { recursive: true, force: true })
    }
  }
}
