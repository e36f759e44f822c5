extension BackupEngine.Result {
    /// The result of a dry run made outside the engine: a live source that asks QEMU how
    /// much is dirty instead of reading the disk.
    public static func dryRun(kind: BackupManifest.Layer.Kind, index: Int, bitmap: String, bytes: UInt64,
                              virtualSize: UInt64) -> BackupEngine.Result {
        BackupEngine.Result(kind: kind, layer: nil, index: index, bitmap: bitmap, bytesCopied: bytes, extents: 0,
                            dryRun: true, virtualSize: virtualSize)
    }
}
