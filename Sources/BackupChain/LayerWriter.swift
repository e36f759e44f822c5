import QCowImage

/// How a layer's clusters are stored: plain, or compressed with zlib or zstd.
public enum LayerCompression: String, Sendable, CaseIterable { case none, zlib, zstd }

/// Writes a backup layer: the planned ranges read from the source in large
/// chunks; clusters that read as zeros become zero clusters (when the layer has
/// a backing file, so they hide older data) or stay unallocated (standalone).
/// Compression runs on every core; the compressed clusters are written in order.
enum LayerWriter {
    static let chunkBytes = 4 << 20

    struct Written {
        /// Guest bytes written as data.
        var bytes: UInt64
        /// The file's chunk digests and identity once synced (durable layers only).
        var digest: (LayerDigest, BackupManifest.Identity)?
    }

    /// Creates `path` and fills it. With `durable` (backup and merge layers) the file is
    /// fsynced before returning, and hashed meanwhile.
    static func write(plan: CopyPlan, from source: BackupSource, to path: String, clusterSize: Int, backing: String?,
                      compression: LayerCompression, durable: Bool = true,
                      progress: ((UInt64, UInt64) -> Void)?) throws -> Written {
        let layer = try QCowCreator.create(at: path, options: options(source, clusterSize, backing, compression))
        defer { layer.close() }
        return try fill(layer, path: path, plan: plan, from: source, clusterSize: clusterSize, hideZeros: backing != nil,
                        compression: compression, durable: durable, progress: progress)
    }

    static func options(_ source: BackupSource, _ clusterSize: Int, _ backing: String?,
                        _ compression: LayerCompression) -> QCowCreateOptions {
        var options = QCowCreateOptions(size: source.virtualSize)
        options.clusterSize = clusterSize
        if let backing {
            options.backingFile = backing
            options.backingFormat = .qcow2
        }
        if compression == .zstd { options.compression = .zstd }
        return options
    }

    /// Copies the plan into the new, empty `layer` (the file at `path`).
    static func fill(_ layer: QCowFile, path: String, plan: CopyPlan, from source: BackupSource, clusterSize: Int,
                     hideZeros: Bool, compression: LayerCompression, durable: Bool,
                     progress: ((UInt64, UInt64) -> Void)?) throws -> Written {
        // The file is new and thrown away if we die before it is complete: one fsync at the end will do.
        layer.syncBarriers = false
        var copier = ChunkCopier(layer: layer, clusterSize: clusterSize, hideZeros: hideZeros,
                                 compressor: compression == .none ? nil : ParallelCompressor(layer.header.compression))
        defer { copier.pipeline.drain() }
        try source.willRead(plan.ranges)
        var done: UInt64 = 0
        for range in plan.ranges {
            var offset = range.lowerBound
            while offset < range.upperBound {
                let n = Int(min(UInt64(copier.chunk), range.upperBound - offset))
                try copier.copy(from: source, at: offset, count: n)
                offset += UInt64(n)
                done += UInt64(n)
                progress?(done, plan.bytes)
            }
        }
        try copier.finish()
        guard durable else { return Written(bytes: copier.written, digest: nil) }
        try layer.writeBack()
        let digest = try LayerDigest.compute(path: path) { try layer.flush() }
        return Written(bytes: copier.written, digest: digest)
    }
}

/// Copies one chunk at a time: reads, zero detection and compression on the
/// caller's thread, the layer written in order on another (`WriteBehind`), so the
/// next chunk is read while the last one is written.
struct ChunkCopier {
    let layer: QCowFile
    let clusterSize: Int
    let hideZeros: Bool
    let compressor: ParallelCompressor?
    let chunk: Int
    /// Each buffer holds a chunk read, then (when compressing) its compressed clusters.
    let pipeline: WriteBehind
    var written: UInt64 = 0

    init(layer: QCowFile, clusterSize: Int, hideZeros: Bool, compressor: ParallelCompressor?) {
        self.layer = layer
        self.clusterSize = clusterSize
        self.hideZeros = hideZeros
        self.compressor = compressor
        chunk = max(LayerWriter.chunkBytes / clusterSize, 1) * clusterSize
        pipeline = WriteBehind(bufferSize: compressor == nil ? chunk : 2 * chunk)
    }

    /// Reads `count` bytes at `offset` (cluster aligned) and queues their writes to the layer.
    mutating func copy(from source: BackupSource, at offset: UInt64, count n: Int) throws {
        let cs = clusterSize
        let chunk = self.chunk
        let clusters = (n + cs - 1) / cs
        let lastLength = n - (clusters - 1) * cs
        var zero = [Bool](repeating: false, count: clusters)
        var sizes = [Int](repeating: 0, count: clusters)
        var data: UInt64 = 0
        let compressor = self.compressor
        try pipeline.submitWhole(fill: { buffer in
            let input = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try source.read(into: input, at: offset)
            for i in 0..<clusters {
                let end = i == clusters - 1 ? n : (i + 1) * cs
                zero[i] = ChunkCopier.isZero(UnsafeRawBufferPointer(rebasing: input[(i * cs)..<end]))
                if !zero[i] { data += UInt64(end - i * cs) }
            }
            if let compressor {
                let zeroFlags = zero
                sizes.withUnsafeMutableBufferPointer { sizes in
                    // A short last cluster (the disk's end) is written plain.
                    compressor.compress(UnsafeRawBufferPointer(input), clusterSize: cs, count: clusters, lastLength: lastLength,
                                        into: UnsafeMutableRawBufferPointer(rebasing: buffer[chunk..<(2 * chunk)]), sizes: sizes,
                                        skip: { zeroFlags[$0] || ($0 == clusters - 1 && lastLength < cs) })
                }
                return 2 * chunk
            }
            return n
        }, write: { [layer, hideZeros] buffer in
            try ChunkCopier.write(buffer, chunk: chunk, count: n, at: offset, zero: zero, sizes: sizes,
                                  compressed: compressor != nil, to: layer, clusterSize: cs, hideZeros: hideZeros)
        })
        written += data
    }

    /// Waits for every queued write; throws the first error one threw.
    func finish() throws { try pipeline.finish() }

    /// Writes one chunk in order: runs of plain data in one write, compressed clusters
    /// one by one, zero runs as zeros (or nothing, without a backing file to hide).
    static func write(_ buffer: UnsafeRawBufferPointer, chunk: Int, count n: Int, at offset: UInt64, zero: [Bool],
                      sizes: [Int], compressed: Bool, to layer: QCowFile, clusterSize cs: Int, hideZeros: Bool) throws {
        let clusters = zero.count
        var i = 0
        while i < clusters {
            let start = i
            let at = offset + UInt64(start * cs)
            if zero[i] {
                while i < clusters && zero[i] { i += 1 }
                if hideZeros { try layer.writeZeroes(at: at, length: UInt64(min(n, i * cs) - start * cs)) }
            } else if compressed && sizes[i] > 0 {
                let from = chunk + i * cs
                try layer.writePrecompressed(UnsafeRawBufferPointer(rebasing: buffer[from..<(from + sizes[i])]),
                                             at: at, guestLength: cs)
                i += 1
            } else {
                while i < clusters && !zero[i] && (!compressed || sizes[i] == 0) { i += 1 }
                try layer.write(UnsafeRawBufferPointer(rebasing: buffer[(start * cs)..<min(n, i * cs)]), at: at)
            }
        }
    }

    /// Whether every byte is zero (a word at a time).
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        for i in 0..<words where bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        for i in (words * 8)..<bytes.count where bytes[i] != 0 { return false }
        return true
    }
}
