extension QCowChecker {
    /// Opens one image file for checking (its backing chain is not needed),
    /// writable and allowing a corrupt or dirty image when `repair` is set.
    public static func open(_ path: String, repair: RepairMode) throws -> QCowFile {
        let writable = repair != .none
        let device = try FileDevice(path: path, writable: writable)
        do {
            try ImageLock.acquire(device, writable: writable)
            guard try ImageOpener.probe(device) == .qcow2 else {
                throw QCowError(.invalidFormat, "not a qcow2 image; check works on qcow2 images", path: path, offset: 0,
                                region: "header")
            }
            let external = try QCowFile.openExternalDataFile(of: device, path: path, writable: false)
            return try QCowFile(device: device, writable: writable, externalDataDevice: external, forRepair: writable)
        } catch {
            device.close()
            throw error
        }
    }
}
