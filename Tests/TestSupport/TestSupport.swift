import QCowImage
