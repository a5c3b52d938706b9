/**
 * The store's conformance suite on both metadata cores: files under a
 * temp directory, and a real etcd on 127.0.0.1 (each test in a namespace
 * of its own).
 */
import { after } from 'node:test'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { TestEtcd, etcdMissing } from '../../test/helpers/etcd.js'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { EtcdCore } from './etcd-core.js'
import { FileCore } from './file-core.js'
import { MetadataStore } from './store.js'
import { runStoreConformance } from './store.conformance.js'

const PORT = 22222

runStoreConformance('file', async () => {
  const dir = await makeTmpDir('ukai-store-')
  const root = join(dir.path, 'metadata')
  return {
    store: new MetadataStore(await FileCore.open(root), PORT),
    cleanup: dir.cleanup,
    openPeer: async () => new MetadataStore(await FileCore.open(root), PORT)
  }
})

let etcd: Promise<TestEtcd> | undefined
after(async () => { if (etcd !== undefined) await (await etcd).destroy() })

const missing = etcdMissing()
if (missing !== undefined) {
  process.stderr.write(`etcd store tests skipped: ${missing}\n`)
} else {
  runStoreConformance('etcd', async () => {
    etcd ??= TestEtcd.start()
    const e = await etcd
    const prefix = `t-${randomBytes(6).toString('hex')}`
    return {
      store: new MetadataStore(new EtcdCore({ servers: e.servers, prefix }), PORT),
      cleanup: async () => {},
      openPeer: async () => new MetadataStore(new EtcdCore({ servers: e.servers, prefix }), PORT)
    }
  })
}
