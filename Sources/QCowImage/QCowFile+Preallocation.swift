#if canImport(Glibc)
import Glibc
#endif

// MARK: - QEMU's view of metadata preallocation

extension QCowFile {
    /// QEMU's qcow2_detect_metadata_preallocation: an image whose refcounted clusters
    /// outnumber the clusters the file really occupies (by 10 %, or by 2) is taken
    /// for preallocated, and then the host file's holes are reported as zeros in
    /// data clusters. `map` follows it so its extents equal qemu-img's.
    public func isMetadataPreallocated() throws -> Bool {
        if let known = metadataPreallocation { return known }
        var result = false
        if let file = device as? FileDevice {
            var st = stat()
            if fstat(file.descriptor.rawValue, &st) == 0 {
                let cs = UInt64(clusterSize)
                let realClusters = UInt64(st.st_blocks) * 512 / cs
                let threshold = max(realClusters * 10 / 9, realClusters + 2)
                let endCluster = (try device.size() + cs - 1) / cs
                var count: UInt64 = 0
                var c: UInt64 = 0
                // Refcounts that cannot be read (a damaged refcount table) say nothing about
                // preallocation: map then reports what the L2 tables say, as info and flatten read them.
                do {
                    while c < endCluster && count < threshold {
                        if try refcount(ofHostOffset: c * cs) > 0 { count += 1 }
                        c += 1
                    }
                    result = count >= threshold
                } catch {
                    result = false
                }
            }
        }
        metadataPreallocation = result
        return result
    }

    /// Splits a data extent at host holes of the data file, as QEMU's block layer does for
    /// preallocated images: (length, reads-as-zero) pieces covering `length` bytes from `host`.
    func hostHolePieces(host: UInt64, length: UInt64) throws -> [(UInt64, Bool)] {
        guard let file = dataDevice as? FileDevice else { return [(length, false)] }
        let size = try file.size()
        var pieces: [(UInt64, Bool)] = []
        var done: UInt64 = 0
        while done < length {
            let at = host + done
            let rest = length - done
            if at >= size {
                pieces.append((rest, true))
                break
            }
            let nextData = file.nextData(from: at)
            if nextData == at {
                let hole = file.nextHole(from: at) ?? size
                let n = min(rest, max(hole, at + 1) - at)
                pieces.append((n, false))
                done += n
            } else if let data = nextData {
                let n = min(rest, data - at)
                pieces.append((n, true))
                done += n
            } else {
                // A hole up to the end of the file: QEMU marks the whole rest zero.
                pieces.append((rest, true))
                break
            }
        }
        return pieces
    }
}
