/** Module resolution hooks (node:module register): 'fuse-native' cannot be found. */
interface ResolveContext { parentURL?: string }
type NextResolve = (specifier: string, context: ResolveContext) => Promise<unknown>

export async function resolve (specifier: string, context: ResolveContext, next: NextResolve): Promise<unknown> {
  if (specifier === 'fuse-native') {
    const err = new Error(`Cannot find package 'fuse-native' imported from ${context.parentURL ?? '?'}`) as NodeJS.ErrnoException
    err.code = 'ERR_MODULE_NOT_FOUND'
    throw err
  }
  return await next(specifier, context)
}
