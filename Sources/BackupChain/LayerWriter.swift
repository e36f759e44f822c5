import QCowImage

/// Writes a backup layer (or a merged layer) through the copier: the planned ranges;
/// clusters that read as zeros become zero clusters when the layer has a backing file
/// (they hide older data there) or stay unallocated when it stands alone. Compression
/// runs on every core.
enum LayerWriter {
    struct Written {
        /// Guest bytes written as data.
        var bytes: UInt64
        /// The file's chunk digests and identity once synced.
        var digest: (LayerDigest, BackupManifest.Identity)
    }

    /// Creates `path`, fills it, fsyncs it and hashes it (`LayerHasher`).
    static func write(plan: CopyPlan, from source: GuestReader, to path: String, clusterSize: Int, backing: String?,
                      compression: CompressionType?, progress: ((UInt64, UInt64) -> Void)?) throws -> Written {
        var options = QCowCreateOptions(size: source.virtualSize)
        options.clusterSize = clusterSize
        if let backing {
            options.backingFile = backing
            options.backingFormat = .qcow2
        }
        if let compression { options.compression = compression }
        let layer = try QCowCreator.create(at: path, options: options)
        defer { layer.close() }
        // The file is new and thrown away if we die before it is complete: one fsync at the end will do.
        layer.syncBarriers = false
        let copy = CopyOptions(zeros: backing == nil ? .skip : .hide, compress: compression != nil)
        // The chunks are hashed from the copy's writes, so the digest costs little after the last one,
        // and whole data clusters go to the disk past the page cache (the fsync at the end waits for them).
        let hasher = try LayerHasher(layer)
        (layer.device as? FileDevice)?.writeDirectWhenAligned()
        let result: CopyResult
        do {
            result = try Copier.copy(plan, from: source, to: .image(layer), options: copy, progress: progress)
            try layer.writeBack()
        } catch {
            hasher.cancel()
            throw error
        }
        let digest = try hasher.finish { try layer.flush() }
        return Written(bytes: result.dataBytes, digest: digest)
    }
}
