import { join } from 'node:path'
import { makeTmpDir } from '../../test/helpers/tmp.js'
import { runCoreConformance } from './core.conformance.js'
import { FileCore } from './file-core.js'

runCoreConformance('file', async () => {
  const dir = await makeTmpDir('ukai-file-core-')
  const root = join(dir.path, 'metadata')
  const a = await FileCore.open(root)
  const b = await FileCore.open(root)
  return {
    a,
    b,
    cleanup: async () => {
      await a.close()
      await b.close()
      await dir.cleanup()
    }
  }
})
