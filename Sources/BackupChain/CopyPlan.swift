import QCowImage

/// The guest ranges a backup copies, aligned to the layer's clusters.
struct CopyPlan {
    var ranges: [Range<UInt64>]
    var bytes: UInt64
    let kind: BackupManifest.Layer.Kind

    static func make(kind: BackupManifest.Layer.Kind, source: BackupSource, bitmap: String, clusterSize: UInt64) throws
        -> CopyPlan
    {
        var ranges: [Range<UInt64>] = []
        var bytes: UInt64 = 0
        let size = source.virtualSize
        func add(_ r: Range<UInt64>) {
            // Round out to whole layer clusters, clipped to the disk, merged with the previous range.
            let lo = r.lowerBound / clusterSize * clusterSize
            let hi = min(size, (r.upperBound + clusterSize - 1) / clusterSize * clusterSize)
            guard lo < hi else { return }
            if let last = ranges.last, last.upperBound >= lo {
                if hi > last.upperBound {
                    bytes += hi - last.upperBound
                    ranges[ranges.count - 1] = last.lowerBound..<hi
                }
            } else {
                ranges.append(lo..<hi)
                bytes += hi - lo
            }
        }
        switch kind {
        case .full:
            // Everything that is data anywhere in the chain; zeros and holes stay unallocated.
            var offset: UInt64 = 0
            while offset < size {
                let status = try source.blockStatus(at: offset, maxLength: size - offset)
                if status.kind == .data { add(offset..<(offset + status.length)) }
                offset += status.length
            }
        case .incremental:
            try source.forEachDirtyExtent(bitmap) { add($0) }
        }
        return CopyPlan(ranges: ranges, bytes: bytes, kind: kind)
    }
}
