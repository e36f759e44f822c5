import QCowImage

extension FuzzTargets {
    /// `check --repair all` on a hostile image, then a self-check as qemu-img check
    /// would run it: when the repair says the image is consistent, the checker on the
    /// image opened afresh from the repaired bytes must find no corruption, no leak
    /// and no check error, and the image must open for writing (corrupt and dirty
    /// bits cleared). A repair may refuse or leave corruptions it cannot fix (QEMU's
    /// cannot fix an L2 table linked onto the L1 table either); it must never trap.
    public static func repair(_ data: UnsafeRawBufferPointer) {
        // Bound what a rebuilt refcount structure can grow the device to.
        guard UInt64(data.count) <= 4 << 20 else { return }
        let device = MemoryDevice(name: "<fuzz>", bytes: Array(data))
        guard let file = try? ImageOpener.openQCow(on: device, writable: true, forCheck: true, files: MemoryFiles()),
              let report = try? QCowChecker.check(file, repair: .all)
        else { return }
        guard report.corruptions == 0, report.checkErrors == 0 else { return }
        let repaired = MemoryDevice(name: "<repaired>", bytes: device.bytes)
        guard let again = try? ImageOpener.openQCow(on: repaired, forCheck: true, files: MemoryFiles()) else {
            expect(false, "the repaired image does not open again")
            return
        }
        guard let recheck = try? QCowChecker.check(again) else {
            expect(false, "the repaired image cannot be checked again")
            return
        }
        expect(recheck.corruptions == 0 && recheck.leaks == 0 && recheck.checkErrors == 0,
               "repair said consistent, but a fresh check finds \(recheck.corruptions) corruption(s), \(recheck.leaks) leak(s): \(recheck.findings.prefix(3))")
        let header = again.header.incompatibleFeatures
        expect(!header.contains(.corrupt) && !header.contains(.dirty), "repair left the corrupt or dirty bit set")
    }
}
