import QCowImage

/// Dirty tracking while qbackup writes guest data, as QEMU does: enabled
/// bitmaps are loaded, marked in_use on disk, marked dirty by every guest
/// write/zero/discard through the write engine's observer, and stored (in_use
/// cleared) when tracking stops. A crash in between leaves them in_use, so the
/// next backup knows not to trust them.
extension BitmapCatalog {
    /// Starts tracking guest writes of `file` in every enabled, consistent bitmap.
    /// Call before writing guest data; call `stopTracking()` (or `close()`) after.
    public func startTracking() throws {
        guard !isTracking else { return }
        guard file.writeObserver == nil else {
            throw BitmapError(.refused, "another observer already tracks writes of this image", path: file.filename)
        }
        let candidates = autoclearBitSet ? entries.filter { $0.isEnabled && inconsistency(of: $0) == nil } : []
        var loaded: [String: DirtyBitmap] = [:]
        for entry in candidates { loaded[entry.name] = try loadFromDisk(entry) }
        if file.writable, bitmapsExtension != nil || staleDirectoryError != nil, !loaded.isEmpty || !autoclearBitSet {
            try update { plan in
                for (i, entry) in plan.entries.enumerated() where loaded[entry.name] != nil {
                    plan.entries[i].flags.insert(.inUse)
                }
            }
        }
        tracked = loaded
        isTracking = true
        file.writeObserver = { [weak self] range, _ in self?.markDirty(range) }
    }

    /// Marks `range` dirty in every tracked bitmap (the write observer).
    func markDirty(_ range: Range<UInt64>) {
        for name in tracked.keys { tracked[name]?.set(range) }
    }

    /// Stores every tracked bitmap with in_use cleared, in one update, and stops tracking.
    public func stopTracking() throws {
        guard isTracking else { return }
        file.writeObserver = nil
        let live = tracked
        let old = entries
        try update { plan in
            for (i, entry) in plan.entries.enumerated() {
                guard let bitmap = live[entry.name], let previous = old.first(where: { $0.nameBytes == entry.nameBytes }) else { continue }
                plan.obsolete += clustersOwned(by: previous)
                let table = try writeBitmap(bitmap, plan: plan)
                plan.entries[i].tableOffset = table.offset
                plan.entries[i].tableSize = table.entries.count
                plan.entries[i].flags.remove(.inUse)
            }
        } after: {
            tracked = [:]
            isTracking = false
        }
    }

    /// Stops tracking (storing the bitmaps) if it is on. The file stays open.
    public func close() throws {
        try stopTracking()
    }
}
